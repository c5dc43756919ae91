// Validates Prometheus Operator objects (a JSON array read from the file named by argv[2])
// against the CRD schemas that @kubernetes-models/prometheus-operator generates from them.
// kubernetes-validate knows only the built-in kinds; deploy/validate.sh hands these here.
import { readFileSync } from 'node:fs';

const docs = JSON.parse(readFileSync(process.argv[2], 'utf8'));
let failed = 0;
for (const doc of docs) {
  const name = `${doc.kind}/${doc.metadata.name}`;
  try {
    const [group, version] = doc.apiVersion.split('/');
    const models = await import(`@kubernetes-models/prometheus-operator/${group}/${version}/${doc.kind}`);
    new models[doc.kind](doc).validate();
    console.log(`ok   ${name} (${doc.apiVersion})`);
  } catch (error) {
    failed += 1;
    console.log(`FAIL ${name}: ${error.message}`);
  }
}
process.exit(failed === 0 ? 0 : 1);

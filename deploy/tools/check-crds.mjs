// Validates CRD objects (a JSON array read from the file named by argv[2]) against the schemas
// that @kubernetes-models generates: Prometheus Operator (ServiceMonitor, PrometheusRule) and
// Gateway API (HTTPRoute). kubernetes-validate knows only the built-in kinds; deploy/validate.sh
// hands these here. The validators check types, required fields, enums and patterns (a Gateway
// API duration such as "1 hour" fails); they do not refuse unknown fields, and CEL rules of the
// CRDs (x-kubernetes-validations) are not evaluated.
import { readFileSync } from 'node:fs';

const packages = {
  'monitoring.coreos.com': '@kubernetes-models/prometheus-operator',
  'gateway.networking.k8s.io': '@kubernetes-models/gateway-api',
};

const docs = JSON.parse(readFileSync(process.argv[2], 'utf8'));
let failed = 0;
for (const doc of docs) {
  const name = `${doc.kind}/${doc.metadata.name}`;
  try {
    const [group, version] = doc.apiVersion.split('/');
    const pkg = packages[group];
    if (!pkg) throw new Error(`no schema for API group ${group}`);
    const models = await import(`${pkg}/${group}/${version}/${doc.kind}`);
    new models[doc.kind](doc).validate();
    console.log(`ok   ${name} (${doc.apiVersion})`);
  } catch (error) {
    failed += 1;
    console.log(`FAIL ${name}: ${error.message}`);
  }
}
process.exit(failed === 0 ? 0 : 1);

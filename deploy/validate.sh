#!/usr/bin/env bash
# Offline checks of everything deployment: the kustomize overlays render and every object
# validates against the Kubernetes schemas (kubernetes-validate, strict: unknown fields fail),
# the Prometheus Operator and Gateway API objects against their CRD schemas, the alert rules
# with promtool (syntax and unit tests in deploy/k8s/alerts.test.yaml), every kubectl and curl
# line of the runbooks (deploy/check-runbooks.sh), the Dockerfile with hadolint, the compose
# file and the GitHub workflow against their JSON schemas, the shell scripts with shellcheck.
#
# Needs kubectl (for `kubectl kustomize`), python3, node/npm; installs the rest (a venv, the
# npm models, Debian's prometheus package for promtool) when missing. Run from anywhere.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

tools_venv="${RDEV_TOOLS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/rdev-api/deploy-venv}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

step() { printf -- '--- %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

step "tools"
if ! cmp -s deploy/tools/requirements.txt "$tools_venv/requirements.txt" 2>/dev/null; then
  python3 -m venv "$tools_venv"
  "$tools_venv/bin/pip" install -q --disable-pip-version-check -r deploy/tools/requirements.txt
  cp deploy/tools/requirements.txt "$tools_venv/requirements.txt"
fi
py="$tools_venv/bin/python"
if ! command -v promtool >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
(cd deploy/tools && npm ci --no-audit --no-fund --silent)

# Splits a rendered stream into built-in objects (for kubernetes-validate) and CRD objects of the
# Prometheus Operator and the Gateway API (JSON, for check-crds.mjs); any other API group fails,
# so no kind goes unchecked.
split_rendered() {
  "$py" - "$1" "$2" "$3" <<'PY'
import json, sys, yaml
source, core_path, crd_path = sys.argv[1:]
core, crds = [], []
for doc in yaml.safe_load_all(open(source)):
    if not doc:
        continue
    group = doc["apiVersion"].rpartition("/")[0]
    if group in ("monitoring.coreos.com", "gateway.networking.k8s.io"):
        crds.append(doc)
    elif group in ("", "apps", "autoscaling", "policy", "networking.k8s.io", "rbac.authorization.k8s.io"):
        core.append(doc)
    else:
        sys.exit(f"{source}: {doc['kind']} ({doc['apiVersion']}) has no schema check here")
yaml.safe_dump_all(core, open(core_path, "w"), sort_keys=False)
json.dump(crds, open(crd_path, "w"))
print(f"{len(core)} built-in objects, {len(crds)} CRD objects (Prometheus Operator, Gateway API)")
PY
}

kube_validate() {
  local out
  out="$("$tools_venv/bin/kubernetes-validate" --strict --quiet "$@" 2>&1)" || { printf '%s\n' "$out"; return 1; }
  # A kind without a schema is only a warning there: here it is a failure.
  if grep -q "Couldn't find schema" <<<"$out"; then printf '%s\n' "$out"; return 1; fi
  [ -z "$out" ] || printf '%s\n' "$out"
  echo "kubernetes-validate --strict: every object valid"
}

for overlay in dev prod gateway; do
  step "kustomize overlays/$overlay"
  kubectl kustomize "deploy/k8s/overlays/$overlay" > "$work/$overlay.yaml"
  split_rendered "$work/$overlay.yaml" "$work/$overlay-core.yaml" "$work/$overlay-crds.json"
  kube_validate "$work/$overlay-core.yaml" || fail "overlays/$overlay: Kubernetes schema"
  node deploy/tools/check-crds.mjs "$work/$overlay-crds.json" || fail "overlays/$overlay: CRD schema"
  # The runbook's commands name these: keep them stable.
  "$py" - "$work/$overlay.yaml" <<'PY' || fail "overlays/$overlay: names the runbooks rely on"
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
deployment = next(d for d in docs if d["kind"] == "Deployment")
assert deployment["metadata"]["name"] == "rdev-api", "Deployment is named rdev-api"
assert deployment["metadata"]["namespace"] == "rdev", "namespace rdev"
assert deployment["spec"]["template"]["metadata"]["labels"]["app"] == "rdev-api", "label app=rdev-api"
container = deployment["spec"]["template"]["spec"]["containers"][0]
assert container["ports"][0]["containerPort"] == 8080, "port 8080"
assert "memory" in container["resources"]["limits"], "a memory limit (RdevAPIHighMemory divides by it)"
config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
spec = deployment["spec"]["template"]["spec"]
budget = 5 + int(config["RDEV_DRAIN_DELAY_SECS"]) + int(config["RDEV_SHUTDOWN_GRACE_SECS"]) + int(config["RDEV_KILL_GRACE_SECS"])
assert spec["terminationGracePeriodSeconds"] > budget, f"terminationGracePeriodSeconds covers preStop + drain + grace + kill ({budget} s)"
# Every variable set is one the server reads (README's Configuration table), so a typo fails here.
import re
known = set(re.findall(r"^\| `([A-Z_]+)` \|", open("README.md").read(), re.M)) | {"RUST_LOG"}
secret = yaml.safe_load(open("deploy/k8s/secret.example.yaml"))["stringData"]
unknown = sorted((set(config) | set(secret)) - known)
assert not unknown, f"variables the README's Configuration table does not list: {unknown}"
print("names, port, memory limit, shutdown budget and variables as the runbooks and the server expect")
PY
  # runbook_url: an absolute link (the overlay's runbook-urls.yaml + the file name) whose path
  # names a runbook that exists in docs/operations/.
  "$py" - "$work/$overlay.yaml" <<'PY' || fail "overlays/$overlay: runbook_url"
import os, sys, yaml
from urllib.parse import unquote, urlsplit
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
alerts = [r for d in docs if d["kind"] == "PrometheusRule" for g in d["spec"]["groups"] for r in g["rules"] if "alert" in r]
bases, problems = set(), []
for rule in alerts:
    url = (rule.get("annotations") or {}).get("runbook_url") or ""
    parts = urlsplit(url)
    _, found, name = unquote(parts.path).rpartition("/docs/operations/")
    if parts.scheme != "https" or not parts.netloc:
        problems.append(f"{rule['alert']}: runbook_url {url!r} is not an absolute https URL")
    elif not found or "/" in name or not os.path.isfile(os.path.join("docs/operations", name)):
        problems.append(f"{rule['alert']}: runbook_url {url} names no file in docs/operations/")
    else:
        bases.add(f"{parts.scheme}://{parts.netloc}{unquote(parts.path)[: -len(name)]}")
if len(bases) > 1:
    problems.append(f"runbook URLs from more than one base (one setting: runbook-urls.yaml): {sorted(bases)}")
if problems or not alerts:
    sys.exit("\n".join(problems) or "no alerts")
print(f"{len(alerts)} alerts, each runbook_url {bases.pop()}<file> with <file> in docs/operations/")
PY
done

step "secret.example.yaml"
kube_validate deploy/k8s/secret.example.yaml || fail "secret.example.yaml"
git check-ignore -q deploy/k8s/secrets.yaml || fail "deploy/k8s/secrets.yaml must be git-ignored"

step "alert rules (promtool)"
"$py" - "$work/prod.yaml" "$work/rules.yaml" <<'PY'
import sys, yaml
rule = next(d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "PrometheusRule")
yaml.safe_dump(rule["spec"], open(sys.argv[2], "w"), sort_keys=False)
PY
cp deploy/k8s/alerts.test.yaml "$work/"
promtool check rules "$work/rules.yaml"
(cd "$work" && promtool test rules alerts.test.yaml)

step "runbooks: every kubectl line through kubectl, every curl line reachable"
PYTHON="$py" deploy/check-runbooks.sh

step "Dockerfile (hadolint)"
"$tools_venv/bin/hadolint" Dockerfile
echo "hadolint: clean"

step "docker-compose.yml"
"$tools_venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml
if docker compose version >/dev/null 2>&1; then
  docker compose config --quiet && echo "docker compose config: ok"
else
  echo "docker compose is not installed here: checked against the Compose Specification schema only"
fi

step "GitHub workflow"
"$tools_venv/bin/check-jsonschema" --builtin-schema vendor.github-workflows .github/workflows/*.yml

step "shell scripts (shellcheck)"
mapfile -t scripts < <(git ls-files -co --exclude-standard '*.sh' 'scripts/*' '.ci/run')
"$tools_venv/bin/shellcheck" "${scripts[@]}"
echo "shellcheck: ${#scripts[@]} scripts clean"

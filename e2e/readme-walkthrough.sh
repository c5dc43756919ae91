#!/usr/bin/env bash
# Runs the curl walkthrough of README.md (the ```sh block of "## Walkthrough" that calls curl),
# exactly as written except for the address, against a fresh embedded server (SQLite in a scratch
# directory, the admin key the README exports, a port chosen by the kernel). Each command must
# exit 0 (bash -e, pipefail) and each HTTP answer must be 2xx, or 422 for the validation example.
# Then the same for any curl block in docs/api.md, in the same shell.
#
#   e2e/readme-walkthrough.sh            # builds the binary first unless rdev_bin is set
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
# shellcheck source=SCRIPTDIR/lib.sh
. e2e/lib.sh

if [ -z "${rdev_bin:-}" ]; then
  cargo build --locked --bin rdev-api
  rdev_bin="$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)/debug/rdev-api"
fi
scratch="$(mktemp -d)"
server_pid=""
cleanup() {
  [ -z "$server_pid" ] || { kill -TERM "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; }
  rm -rf "$scratch"
}
trap cleanup EXIT

# Collects the sh blocks that call curl: under "## Walkthrough" in README.md, anywhere in api.md.
extract() {
  python3 - "$1" "$2" <<'PY'
import re, sys
path, section = sys.argv[1:]
text = open(path).read()
if section:
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    if not match:
        sys.exit(f"{path}: no section '## {section}'")
    text = match.group(1)
blocks = re.findall(r"^```(?:sh|bash|shell)\n(.*?)^```", text, re.S | re.M)
print("\n".join(b for b in blocks if re.search(r"^\s*curl |\$\(curl ", b, re.M)))
PY
}
extract README.md Walkthrough >"$scratch/walkthrough.sh"
extract docs/api.md "" >"$scratch/api.sh"
[ -s "$scratch/walkthrough.sh" ] || { echo "README.md: no curl block under ## Walkthrough" >&2; exit 1; }

admin_key="$(sed -n 's/^export RDEV_KEY=//p' "$scratch/walkthrough.sh" | head -n 1)"
[ -n "$admin_key" ] || { echo "README.md: the walkthrough no longer exports RDEV_KEY" >&2; exit 1; }
mkdir "$scratch/cwd"
start_server walkthrough "$scratch/server.log" \
  DATABASE_URL="sqlite://$scratch/cwd/rdev.db" RDEV_BOOTSTRAP_ADMIN_KEY="$admin_key" RDEV_DRAIN_DELAY_SECS=0
address="${server_url#http://}"
echo "server at $server_url"

{
  # Every curl reports its status line on stderr, which this script reads afterwards (and shows
  # no progress meter, which curl prints only because its output is not a terminal here).
  # shellcheck disable=SC2016
  printf '%s\n' 'curl() { command curl --no-progress-meter -w "%{stderr}HTTP %{http_code} %{method} %{url}\n" "$@"; }'
  sed "s/localhost:8080/$address/g" "$scratch/walkthrough.sh"
  if [ -s "$scratch/api.sh" ]; then sed "s/localhost:8080/$address/g" "$scratch/api.sh"; fi
} >"$scratch/run.sh"
[ -s "$scratch/api.sh" ] || echo "docs/api.md: no curl commands to run"

echo "--- running $(grep -c 'curl ' "$scratch/run.sh") curl lines"
status=0
(cd "$scratch/cwd" && bash -euo pipefail "$scratch/run.sh") >"$scratch/stdout" 2>"$scratch/stderr" || status=$?
grep '^HTTP ' "$scratch/stderr" || true
if [ "$status" -ne 0 ]; then
  echo "the walkthrough stopped with status $status" >&2
  cat "$scratch/stdout" "$scratch/stderr" >&2
  exit 1
fi
bad="$(grep '^HTTP ' "$scratch/stderr" | grep -Ev '^HTTP (2[0-9][0-9]|422) ' || true)"
if [ -n "$bad" ]; then
  printf 'unexpected HTTP status:\n%s\n' "$bad" >&2
  cat "$scratch/stdout" >&2
  exit 1
fi
if grep -v '^HTTP ' "$scratch/stderr" | grep -q .; then
  echo "stderr besides the status lines:" >&2
  grep -v '^HTTP ' "$scratch/stderr" >&2
  exit 1
fi
echo "README walkthrough: every command exited 0 and every answer was as documented"

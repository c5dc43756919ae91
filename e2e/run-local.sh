#!/usr/bin/env bash
# e2e here, without Docker: builds rdev-api, starts two replicas on a fresh scratch database of
# the local Postgres (DATABASE_URL names the server; the database is created and dropped here),
# runs e2e/scenarios.sh across them (submit on one, watch and cancel on the other), checks that
# every rdev_ metric the alert rules use is exported, stops both with SIGTERM (each must drain
# and exit 0), then runs the README walkthrough against a server of its own.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
# shellcheck source=SCRIPTDIR/lib.sh
. e2e/lib.sh

postgres_url="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
database="rdev_e2e_$$_$(date +%s)"
database_url="${postgres_url%/*}/$database"
scratch="$(mktemp -d)"
pids=()

cleanup() {
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  psql -q "$postgres_url" -c "DROP DATABASE IF EXISTS \"$database\" WITH (FORCE)" >/dev/null \
    || echo "could not drop the scratch database $database" >&2
  rm -rf "$scratch"
}
trap cleanup EXIT

echo "--- build"
cargo build --locked --bin rdev-api
rdev_bin="$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)/debug/rdev-api"
export rdev_bin

echo "--- scratch database $database"
psql -q "$postgres_url" -c "CREATE DATABASE \"$database\""

admin_key="$(new_admin_key)"
shared=(
  DATABASE_URL="$database_url"
  RDEV_BOOTSTRAP_ADMIN_KEY="$admin_key"
  RDEV_STREAM_TOKEN_SECRET="e2e-$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')"
  RDEV_DRAIN_DELAY_SECS=1
  RDEV_SHUTDOWN_GRACE_SECS=5
  RDEV_KILL_GRACE_SECS=1
)
# One after the other: the first migrates the empty database and creates the admin key.
start_server replica-1 "$scratch/replica-1.log" "${shared[@]}"
first="$server_url"
pids+=("$server_pid")
start_server replica-2 "$scratch/replica-2.log" "${shared[@]}"
second="$server_url"
pids+=("$server_pid")
echo "replicas: $first $second"

echo "--- scenarios"
if ! RDEV_E2E_ADMIN_KEY="$admin_key" e2e/scenarios.sh "$first" "$second"; then
  tail -n 40 "$scratch"/replica-*.log >&2
  exit 1
fi

echo "--- alert rules name exported metrics"
curl -fsS "$first/metrics" >"$scratch/metrics.txt"
missing=0
while read -r metric; do
  if grep -q "^${metric}[{ ]" "$scratch/metrics.txt"; then
    echo "exported: $metric"
  else
    echo "NOT exported: $metric" >&2
    missing=1
  fi
done < <(grep -v '^ *#' deploy/k8s/base/prometheusrule.yaml | grep -o 'rdev_[a-z][a-z_]*' | sort -u)
[ "$missing" -eq 0 ]

echo "--- graceful stop"
stop_server "${pids[1]}" replica-2
stop_server "${pids[0]}" replica-1
pids=()
echo "both replicas drained and exited 0"

echo "--- README walkthrough"
e2e/readme-walkthrough.sh

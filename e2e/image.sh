#!/usr/bin/env bash
# The container image, run as the Deployment runs it (deploy/k8s/base/deployment.yaml): read-only
# root, /tmp on a tmpfs, uid/gid 10001, every capability dropped, no-new-privileges, the default
# seccomp profile, the memory limit, the ConfigMap's environment (deploy/k8s/base/config.env)
# and the Secret's variables, with short shutdown times.
#
#   docker build -t rdev-api . && e2e/image.sh [IMAGE]      # IMAGE defaults to rdev-api
#
# 1. One replica with no network at all, on the image's own defaults (0.0.0.0:8080, SQLite on a
#    /data volume), driven through `docker exec ... curl localhost:8080` as the runbooks do:
#    /ready, a local command, the runbook's heap profile read by `go tool pprof -top`, no zombie
#    left by a command's orphaned grandchild (tini reaps), the image's HEALTHCHECK, and
#    `docker stop` (SIGTERM) during a running command: drain, exit 0 within the shutdown budget;
#    a new container on the same volume finds that command cancelled by the shutdown.
# 2. Two replicas on a scratch database of the local Postgres (DATABASE_URL names the server;
#    default postgres://postgres@127.0.0.1:5432/test), with host networking on 127.0.0.1 ports
#    the kernel picks: e2e/scenarios.sh across them, then `docker stop` of both (exit 0).
# Containers, volumes and the database are removed on exit. Needs docker, curl, jq, psql and
# go (Debian's golang-go) for pprof. Exits non-zero with a FAIL line on the first failure.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
# shellcheck source=SCRIPTDIR/lib.sh
. e2e/lib.sh

image="${1:-rdev-api}"
postgres_url="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
database="rdev_image_e2e_$$_$(date +%s)"
database_url="${postgres_url%/*}/$database"
prefix="rdev-image-e2e-$$"
volume="$prefix-data"
scratch="$(mktemp -d)"
containers=()
database_created=0
started=$SECONDS

# Short shutdown settings (the Deployment's are 5/20/5 s), and the budget the stop must fit in:
# drain + grace + kill, plus this margin for the key-usage flush, tini and docker themselves.
drain_delay=1
shutdown_grace=3
kill_grace=1
stop_margin=5

fail() {
  printf 'FAIL: %s\n' "$1" >&2
  shift
  local line
  for line in "$@"; do printf '  %s\n' "$line" >&2; done
  exit 1
}
ok() { printf 'ok - %s\n' "$*"; }
step() { printf -- '--- %s\n' "$*"; }

cleanup() {
  local status=$? container
  if [ "$status" -ne 0 ]; then
    for container in "${containers[@]}"; do
      printf -- '--- last log lines of %s\n' "$container" >&2
      docker logs --tail 30 "$container" >&2 2>&1 || true
    done
  fi
  for container in "${containers[@]}"; do docker rm -f -v "$container" >/dev/null 2>&1 || true; done
  docker volume rm -f "$volume" >/dev/null 2>&1 || true
  if [ "$database_created" -eq 1 ]; then
    psql -q "$postgres_url" -c "DROP DATABASE IF EXISTS \"$database\" WITH (FORCE)" >/dev/null 2>&1 \
      || echo "could not drop the scratch database $database" >&2
  fi
  rm -rf "$scratch"
}
trap cleanup EXIT

for tool in docker curl jq psql; do
  command -v "$tool" >/dev/null || fail "$tool is not installed"
done
docker image inspect "$image" >/dev/null 2>&1 || fail "no image $image: docker build -t $image ."

admin_key="$(new_admin_key)"
# What the pod spec sets, as docker run options.
pod=(
  --read-only
  --tmpfs "/tmp:rw,exec,nosuid,nodev,size=256m"
  --user 10001:10001
  --cap-drop ALL
  --security-opt no-new-privileges
  --memory 512m
  --env-file deploy/k8s/base/config.env
  # The Secret's keys.
  -e RDEV_BOOTSTRAP_ADMIN_KEY="$admin_key"
  -e RDEV_STREAM_TOKEN_SECRET="image-e2e-$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')"
  -e RDEV_AUDIT_KEY="image-e2e-$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')"
  # Here instead of the ConfigMap's: local processes, short shutdown times.
  -e RDEV_EXECUTOR=local
  -e RDEV_EXECUTORS=local
  -e RDEV_DRAIN_DELAY_SECS="$drain_delay"
  -e RDEV_SHUTDOWN_GRACE_SECS="$shutdown_grace"
  -e RDEV_KILL_GRACE_SECS="$kill_grace"
)

# start_isolated NAME: one replica with no network, on the image's defaults and the volume.
start_isolated() {
  docker run -d --name "$1" --network none -v "$volume:/data" "${pod[@]}" \
    -e RDEV_LISTEN_ADDR=0.0.0.0:8080 "$image" >/dev/null
  containers+=("$1")
}

# in_container NAME METHOD PATH [JSON]: an API request from inside the container, to
# localhost:8080 with the admin key. Sets $status and $body.
in_container() {
  local name="$1" method="$2" path="$3" data="${4:-}" out
  local args=(-sS -X "$method" --max-time 30 -w '\n%{http_code}' -H "Authorization: Bearer $admin_key")
  [ -z "$data" ] || args+=(-H 'Content-Type: application/json' --data "$data")
  out="$(docker exec "$name" curl "${args[@]}" "http://localhost:8080$path")" \
    || fail "$method $path in $name: curl failed" "$out"
  status="${out##*$'\n'}"
  # Without trailing newlines, as scenarios.sh reads bodies.
  body="$(printf '%s' "${out%$'\n'*}")"
}

# wait_ready_inside NAME: /ready answers 200 inside the container within 60 s.
wait_ready_inside() {
  local code=""
  for _ in $(seq 1 120); do
    code="$(docker exec "$1" curl -s -o /dev/null -w '%{http_code}' --max-time 3 http://localhost:8080/ready 2>/dev/null || true)"
    [ "$code" != 200 ] || return 0
    [ "$(docker inspect -f '{{.State.Running}}' "$1")" = true ] || fail "$1 exited at start"
    sleep 0.5
  done
  fail "$1: /ready did not answer 200 within 60 s (last: ${code:-no answer})"
}

# wait_command NAME ID STATUS: polls the command inside NAME until it has STATUS (30 s).
wait_command() {
  for _ in $(seq 1 150); do
    in_container "$1" GET "/api/v1/commands/$2"
    [ "$status" = 200 ] || fail "GET /api/v1/commands/$2 answered $status" "$body"
    [ "$(jq -r .status <<<"$body")" != "$3" ] || return 0
    case "$(jq -r .status <<<"$body")" in
      succeeded | failed | cancelled | timed_out | lost) fail "command $2 ended $(jq -r .status <<<"$body"), not $3" "$body" ;;
    esac
    sleep 0.2
  done
  fail "command $2 did not reach $3 within 30 s" "$body"
}

# submit NAME PROJECT COMMAND: sets $command_id.
submit() {
  in_container "$1" POST "/api/v1/projects/$2/commands" "$(jq -nc --arg c "$3" '{command: $c}')"
  [ "$status" = 202 ] || fail "submitting '$3' answered $status" "$body"
  command_id="$(jq -r .id <<<"$body")"
}

# stop_timed NAME: docker stop (SIGTERM, SIGKILL only after 60 s so that a slow exit is
# measured, not cut short); sets $stop_seconds and checks the exit status is 0.
stop_timed() {
  local start end code
  start="$(date +%s%N)"
  docker stop -t 60 "$1" >/dev/null
  end="$(date +%s%N)"
  stop_seconds="$(awk -v ns="$((end - start))" 'BEGIN { printf "%.1f", ns / 1e9 }')"
  code="$(docker inspect -f '{{.State.ExitCode}}' "$1")"
  [ "$code" = 0 ] || fail "$1 exited with status $code after SIGTERM (docker stop), not 0" \
    "$(docker logs --tail 10 "$1" 2>&1)"
}

# ---------------------------------------------------------------------------------------------
step "one replica: no network, SQLite on the /data volume, image defaults"
docker volume create "$volume" >/dev/null
solo="$prefix-solo"
start_isolated "$solo"
wait_ready_inside "$solo"
ok "/ready answers 200 (docker exec $solo curl localhost:8080/ready)"

# PID 1 is tini and the server runs as 10001.
pid1="$(docker exec "$solo" cat /proc/1/comm)"
[ "$pid1" = tini ] || fail "PID 1 in the container is '$pid1', not tini (nothing would reap orphans)"
server_uid="$(docker exec "$solo" sh -c 'for p in /proc/[0-9]*; do [ "$(cat "$p/comm" 2>/dev/null)" = rdev-api ] && awk "/^Uid:/ {print \$2}" "$p/status"; done; true' | head -n 1)"
[ "$server_uid" = 10001 ] || fail "rdev-api runs as uid '${server_uid:-?}', not 10001"
ok "PID 1 is tini; rdev-api runs as uid 10001"

in_container "$solo" POST /api/v1/projects \
  "$(jq -nc --arg name "image-e2e-$$" '{name: $name, workdir: "/tmp", executor: "local"}')"
[ "$status" = 201 ] || fail "creating a local project answered $status" "$body"
project="$(jq -r .id <<<"$body")"
submit "$solo" "$project" "echo hello"
wait_command "$solo" "$command_id" succeeded
in_container "$solo" GET "/api/v1/commands/$command_id/output"
if [ "$status" != 200 ] || [ "$body" != hello ]; then
  fail "the output of 'echo hello' is not 'hello'" "HTTP $status: $body"
fi
ok "a local command runs: 'echo hello' succeeded with output 'hello'"

# Two grandchildren outlive the command's shell: 'sleep 30' stays in its process group and is
# killed with it when the shell exits; 'sleep 3', in a session of its own (setsid, given half a
# second to get there), is out of the group's reach and exits later. Both are re-parented to
# PID 1, and both must be reaped there.
submit "$solo" "$project" "setsid sleep 3 >/dev/null 2>&1 & sleep 30 >/dev/null 2>&1 & sleep 0.5; exit 0"
wait_command "$solo" "$command_id" succeeded
# shellcheck disable=SC2016 # expanded by the container's sh, not here.
orphans='for p in /proc/[0-9]*; do
  [ "$(cat "$p/cmdline" 2>/dev/null | tr "\0" " ")" = "sleep 3 " ] && awk "/^PPid:/ {print \$2}" "$p/status"
done; true'
parent="$(docker exec "$solo" sh -c "$orphans" | head -n 1)"
[ "$parent" = 1 ] || fail "the command's grandchild ('sleep 3') was not found re-parented to PID 1 (parent: '${parent:-gone already}')"
for _ in $(seq 1 50); do
  [ -n "$(docker exec "$solo" sh -c "$orphans")" ] || break
  sleep 0.2
done
zombies="$(docker exec "$solo" sh -c 'for s in /proc/[0-9]*/stat; do sed -n "s/^\([0-9]*\) (\(.*\)) Z .*/\1 \2/p" "$s" 2>/dev/null; done; true')"
[ -z "$zombies" ] || fail "zombie processes in the container after an orphaned grandchild exited (PID 1 does not reap):" "$zombies"
ok "an orphaned grandchild is re-parented to tini and reaped: no zombie left"

# The runbook's line, verbatim (docs/operations/runbook-high-memory.md), then the file out of the
# container (docker cp cannot read a tmpfs; kubectl cp streams it the same way) and pprof on it.
docker exec "$solo" curl -o /tmp/heap.prof localhost:8080/debug/pprof/heap 2>"$scratch/curl.err" \
  || fail "docker exec $solo curl -o /tmp/heap.prof localhost:8080/debug/pprof/heap failed" "$(cat "$scratch/curl.err")"
docker exec "$solo" cat /tmp/heap.prof >"$scratch/heap.prof"
[ -s "$scratch/heap.prof" ] || fail "the heap profile is empty"
command -v go >/dev/null || fail "go is not installed (Debian: golang-go): go tool pprof reads the heap profile"
# No local binaries to symbolise with: the profile must carry its function names itself.
mkdir -p "$scratch/no-binaries"
PPROF_BINARY_PATH="$scratch/no-binaries" go tool pprof -top "$scratch/heap.prof" >"$scratch/pprof.txt" 2>&1 \
  || fail "go tool pprof -top could not read the heap profile" "$(head -n 20 "$scratch/pprof.txt")"
# The top lines name functions, not addresses; the full stacks reach into the server's code.
! grep -Eq '^ .*%  +0x[0-9a-f]+$' "$scratch/pprof.txt" \
  || fail "go tool pprof -top shows addresses, not function names: /debug/pprof/heap does not symbolise its profile in-process, and the operator has no binary to symbolise it with" \
    "$(head -n 12 "$scratch/pprof.txt")"
PPROF_BINARY_PATH="$scratch/no-binaries" go tool pprof -traces "$scratch/heap.prof" >"$scratch/traces.txt" 2>&1
grep -Eq 'rdev_api|tokio|block_on' "$scratch/traces.txt" \
  || fail "the heap profile's stacks name none of the server's functions" \
    "$(head -n 30 "$scratch/traces.txt")"
ok "the runbook's heap profile reads with go tool pprof -top, with function names"

# The image's HEALTHCHECK (curl /health every 10 s), which compose's depends_on relies on.
health=""
for _ in $(seq 1 60); do
  health="$(docker inspect -f '{{.State.Health.Status}}' "$solo")"
  [ "$health" = starting ] || break
  sleep 0.5
done
[ "$health" = healthy ] || fail "the image's HEALTHCHECK says '$health', not healthy" \
  "$(docker inspect -f '{{json .State.Health}}' "$solo")"
ok "the image's HEALTHCHECK reports healthy"

# SIGTERM while a command runs: the server drains, lets it run for the shutdown grace, stops it,
# and exits 0, all within the budget.
submit "$solo" "$project" "sleep 600"
long="$command_id"
wait_command "$solo" "$long" running
stop_timed "$solo"
budget=$((drain_delay + shutdown_grace + kill_grace + stop_margin))
awk -v s="$stop_seconds" -v b="$budget" 'BEGIN { exit !(s <= b) }' \
  || fail "docker stop took ${stop_seconds} s, beyond the shutdown budget of $budget s (drain $drain_delay + grace $shutdown_grace + kill $kill_grace + margin $stop_margin)"
docker logs "$solo" >"$scratch/solo.log" 2>&1
grep -q 'SIGTERM received' "$scratch/solo.log" \
  || fail "the server did not log 'SIGTERM received': the signal did not reach it through tini"
ok "docker stop during a running command: drained and exited 0 in ${stop_seconds} s (budget $budget s)"

# The same volume in a new container: the data survived, and the interrupted command says why.
again="$prefix-again"
start_isolated "$again"
wait_ready_inside "$again"
in_container "$again" GET "/api/v1/commands/$long"
[ "$(jq -r '"\(.status) \(.termination_reason)"' <<<"$body")" = "cancelled shutdown" ] \
  || fail "the command running at the stop is not 'cancelled' with reason 'shutdown' after a restart on the volume" "$body"
stop_timed "$again"
ok "a new container on the /data volume finds the command cancelled by the shutdown; idle stop took ${stop_seconds} s"

# ---------------------------------------------------------------------------------------------
step "two replicas on Postgres ($database), host network, 127.0.0.1 ports the kernel picks"
psql -q "$postgres_url" -c "CREATE DATABASE \"$database\"" || fail "could not create the scratch database $database"
database_created=1

# start_replica NAME: host networking on 127.0.0.1:0; sets $replica_url from the log line. No
# HEALTHCHECK: it would curl 127.0.0.1:8080 of the host.
start_replica() {
  local address=""
  docker run -d --name "$1" --network host --no-healthcheck "${pod[@]}" \
    -e DATABASE_URL="$database_url" -e RDEV_LISTEN_ADDR=127.0.0.1:0 "$image" >/dev/null
  containers+=("$1")
  for _ in $(seq 1 120); do
    address="$(docker logs "$1" 2>&1 | grep -m1 '"rdev-api listening"' | jq -r .address || true)"
    [ -z "$address" ] || break
    [ "$(docker inspect -f '{{.State.Running}}' "$1")" = true ] || fail "$1 exited at start"
    sleep 0.5
  done
  [ -n "$address" ] || fail "$1 did not log 'rdev-api listening' within 60 s"
  replica_url="http://$address"
  for _ in $(seq 1 60); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 3 "$replica_url/ready" || true)" != 200 ] || return 0
    sleep 0.5
  done
  fail "$1: $replica_url/ready did not answer 200"
}
# One after the other: the first migrates the empty database and creates the admin key.
start_replica "$prefix-1"
first="$replica_url"
start_replica "$prefix-2"
second="$replica_url"
ok "both replicas ready: $first $second"

RDEV_E2E_ADMIN_KEY="$admin_key" e2e/scenarios.sh "$first" "$second" \
  || fail "e2e/scenarios.sh $first $second failed"
ok "e2e/scenarios.sh across the two replicas"

stop_timed "$prefix-2"
second_stop="$stop_seconds"
stop_timed "$prefix-1"
ok "both replicas drained and exited 0 on docker stop (${second_stop} s, ${stop_seconds} s)"

printf 'image e2e of %s: all checks passed in %d s\n' "$image" "$((SECONDS - started))"

#!/usr/bin/env bash
# Black-box scenarios against a running rdev-api deployment, over HTTP only.
#
#   RDEV_E2E_ADMIN_KEY=rdev_... e2e/scenarios.sh URL [SECOND_URL]
#
# With two URLs (two replicas of one deployment, e.g. docker-compose.yml's :8081 and :8082),
# commands are submitted on the first and watched, cancelled and read on the second, which
# proves the shared queue, the cross-replica event stream and the shared stream-token secret.
# RDEV_E2E_PROJECT (JSON) overrides the project's executor fields; the default runs commands as
# local processes in /tmp, e.g. '{"executor":"kube","workdir":"/work","target":{...}}' for pods.
# Everything created is removed at the end. Needs curl and jq; exits non-zero on the first failure.
set -euo pipefail

first="${1:?usage: RDEV_E2E_ADMIN_KEY=... $0 URL [SECOND_URL]}"
second="${2:-$first}"
first="${first%/}"
second="${second%/}"
admin="${RDEV_E2E_ADMIN_KEY:?set RDEV_E2E_ADMIN_KEY to an admin key of the deployment}"
local_project='{"workdir": "/tmp", "executor": "local"}'
project_fields="${RDEV_E2E_PROJECT:-$local_project}"
nonce="$(date +%s)$RANDOM"
scratch="$(mktemp -d)"
passed=0
project_id=""
key_id=""

cleanup() {
  # Best effort: a failed scenario must not leave a project or a key behind.
  if [ -n "$key_id" ]; then request DELETE "$first/api/v1/api-keys/$key_id" "$admin" >/dev/null 2>&1 || true; fi
  if [ -n "$project_id" ]; then request DELETE "$first/api/v1/projects/$project_id" "$admin" >/dev/null 2>&1 || true; fi
  rm -rf "$scratch"
}
trap cleanup EXIT

fail() {
  printf 'not ok - %s\n' "$1"
  shift
  [ $# -eq 0 ] || printf '  %s\n' "$@"
  printf '%d passed, 1 failed\n' "$passed"
  exit 1
}
ok() {
  passed=$((passed + 1))
  printf 'ok - %s\n' "$1"
}

# request METHOD URL KEY [JSON]: sets $status and $body.
request() {
  local method="$1" url="$2" key="$3" data="${4:-}"
  local args=(-sS -X "$method" -o "$scratch/body" -w '%{http_code}' --max-time 30)
  [ -z "$key" ] || args+=(-H "Authorization: Bearer $key")
  [ -z "$data" ] || args+=(-H 'Content-Type: application/json' --data "$data")
  status="$(curl "${args[@]}" "$url")" || fail "$method $url: curl failed"
  body="$(cat "$scratch/body")"
}
expect_status() {
  [ "$status" = "$1" ] || fail "$2" "expected HTTP $1, got $status: $body"
}
json() { jq -r "$1" <<<"$body"; }

# stream URL KEY [HEADER]: the whole event stream of a command, which ends after `end`.
stream() {
  local args=(-sS -N --max-time 60)
  [ -z "$2" ] || args+=(-H "Authorization: Bearer $2")
  [ -z "${3:-}" ] || args+=(-H "$3")
  curl "${args[@]}" "$1" || fail "stream $1 did not end by itself within 60 s"
}
# wait_for_status URL KEY STATUS: polls a command until it has STATUS (20 s at most).
wait_for_status() {
  for _ in $(seq 1 100); do
    request GET "$1" "$2"
    [ "$(json .status)" != "$3" ] || return 0
    sleep 0.2
  done
  fail "command at $1 reached status $3" "last seen: $body"
}

# --- Both replicas are up.
for url in "$first" "$second"; do
  request GET "$url/ready" ""
  expect_status 200 "$url/ready answers 200"
done
ok "every replica is ready"

request GET "$first/api/v1/me" "$admin"
expect_status 200 "the admin key authenticates"
jq -e '.scopes | index("admin")' <<<"$body" >/dev/null || fail "the admin key has the admin scope" "$body"
ok "the admin key authenticates with the admin scope"

# --- Project and a key limited to it.
request POST "$first/api/v1/projects" "$admin" \
  "$(jq -nc --arg name "e2e-$nonce" --argjson fields "$project_fields" '{name: $name, max_concurrency: 2} + $fields')"
expect_status 201 "create a project"
project_id="$(json .id)"
ok "an admin creates project e2e-$nonce"

request POST "$first/api/v1/api-keys" "$admin" \
  "$(jq -nc --arg name "e2e-$nonce" --arg project "$project_id" '{name: $name, scopes: ["execute"], project_ids: [$project]}')"
expect_status 201 "create an API key"
key_id="$(json .id)"
key="$(json .secret)"
[[ "$key" == rdev_* ]] || fail "the new key's secret is returned once" "$body"
ok "an admin creates an execute key limited to the project"

request GET "$second/api/v1/me" "$key"
expect_status 200 "the new key authenticates on the other replica"
request GET "$second/api/v1/api-keys" "$key"
expect_status 403 "an execute key cannot list keys"
ok "the new key works on every replica and cannot manage keys"

# --- A command: submitted on one replica, watched and read on the other.
request POST "$first/api/v1/projects/$project_id/commands" "$key" \
  "$(jq -nc --arg n "$nonce" '{command: "echo out-\($n); echo err-\($n) >&2; exit 3", priority: "high"}')"
expect_status 202 "submit a command"
command_id="$(json .id)"
[ "$(json .links.events)" = "/api/v1/commands/$command_id/events" ] || fail "the 202 links to the event stream" "$body"
ok "a command is accepted with 202 and its links"

events="$(stream "$second/api/v1/commands/$command_id/events" "$key")"
grep -q "^event: end" <<<"$events" || fail "the stream ends with an end event" "$events"
grep -q "out-$nonce" <<<"$events" || fail "the stream carries stdout" "$events"
grep -q "err-$nonce" <<<"$events" || fail "the stream carries stderr" "$events"
end="$(grep -A1 '^event: end' <<<"$events" | sed -n 's/^data: //p')"
[ "$(jq -r '"\(.status) \(.exit_code) \(.termination_reason)"' <<<"$end")" = "failed 3 exit" ] \
  || fail "the end event says failed, exit code 3" "$end"
ok "the other replica streams the output and the end over SSE"

last_id="$(sed -n 's/^id: //p' <<<"$events" | tail -n 1)"
resumed="$(stream "$first/api/v1/commands/$command_id/events" "$key" "Last-Event-ID: 1")"
grep -q '^id: 1$' <<<"$resumed" && fail "a resumed stream does not repeat event 1" "$resumed"
[ "$(sed -n 's/^id: //p' <<<"$resumed" | tail -n 1)" = "$last_id" ] || fail "a resumed stream replays up to the last event" "$resumed"
ok "Last-Event-ID resumes after the given event"

request GET "$second/api/v1/commands/$command_id" "$key"
expect_status 200 "read the command"
[ "$(json '"\(.status) \(.exit_code) \(.termination_reason)"')" = "failed 3 exit" ] || fail "the command is failed with exit code 3" "$body"
request GET "$second/api/v1/commands/$command_id/output?stream=stdout" "$key"
expect_status 200 "read the stored output"
[ "$body" = "out-$nonce" ] || fail "the stored stdout is the command's" "$body"
ok "the stored state and output match on the other replica"

request POST "$first/api/v1/commands/$command_id/stream-token" "$key"
expect_status 200 "ask for a stream token"
events_url="$(json .events_url)"
tokened="$(stream "$second$events_url" "")"
grep -q "out-$nonce" <<<"$tokened" || fail "a stream token from one replica opens the stream on the other" "$tokened"
ok "a browser stream token works across replicas"

# --- Cancel a long command from the other replica.
request POST "$first/api/v1/projects/$project_id/commands" "$key" '{"command": "sleep 600"}'
expect_status 202 "submit a long command"
long_id="$(json .id)"
wait_for_status "$second/api/v1/commands/$long_id" "$key" running
request POST "$second/api/v1/commands/$long_id/cancel" "$key"
expect_status 202 "cancel a running command"
wait_for_status "$first/api/v1/commands/$long_id" "$key" cancelled
[ "$(json .termination_reason)" = "cancel" ] || fail "a cancelled command says why it ended" "$body"
request POST "$first/api/v1/commands/$long_id/cancel" "$key"
expect_status 409 "cancelling an ended command is a conflict"
ok "a running command is cancelled from the other replica"

# --- Audit trail.
request GET "$first/api/v1/audit?target_id=$command_id" "$admin"
expect_status 200 "read the audit log"
jq -e '[.items[].action] | index("command.submitted") and index("command.finished")' <<<"$body" >/dev/null \
  || fail "the audit log records the command's submission and end" "$body"
request GET "$second/api/v1/audit/verify" "$admin"
expect_status 200 "verify the audit chain"
[ "$(json .ok)" = "true" ] || fail "the audit hash chain verifies" "$body"
ok "the audit log records the command and its hash chain verifies"

# --- Clean up, checking that revocation and deletion work.
request DELETE "$first/api/v1/api-keys/$key_id" "$admin"
expect_status 200 "revoke the key"
request GET "$first/api/v1/me" "$key"
expect_status 401 "a revoked key is refused"
key_id=""
request DELETE "$first/api/v1/projects/$project_id" "$admin"
expect_status 204 "delete the project"
project_id=""
ok "the key is revoked and the project deleted"

printf '%d passed, 0 failed\n' "$passed"

# shellcheck shell=bash
# Shared by run-local.sh and readme-walkthrough.sh (sourced, not run).
# shellcheck disable=SC2034 # server_url and server_pid are results for the caller.

# start_server NAME LOGFILE [VAR=VALUE...]: starts "$rdev_bin" on a free loopback port chosen by
# the kernel (port 0, never a probed-then-rebound one) and waits for its "listening" log line.
# Sets $server_url (its base URL) and $server_pid. Not in a subshell: the caller waits for it.
start_server() {
  local name="$1" log="$2"
  shift 2
  : "${rdev_bin:?set rdev_bin to the rdev-api binary}"
  env "$@" RDEV_LISTEN_ADDR=127.0.0.1:0 RDEV_LOG_FORMAT=json "$rdev_bin" >"$log" 2>&1 &
  server_pid=$!
  local address=""
  for _ in $(seq 1 150); do
    address="$(grep -m1 '"rdev-api listening"' "$log" 2>/dev/null | jq -r .address || true)"
    [ -z "$address" ] || break
    kill -0 "$server_pid" 2>/dev/null || { echo "$name exited at start:" >&2; cat "$log" >&2; return 1; }
    sleep 0.2
  done
  [ -n "$address" ] || { echo "$name did not listen within 30 s:" >&2; cat "$log" >&2; return 1; }
  server_url="http://$address"
}

# stop_server PID NAME: SIGTERM, as an orchestrator stops it; the drain must end with exit 0.
stop_server() {
  local pid="$1" name="$2" code=0
  kill -TERM "$pid" 2>/dev/null || return 0
  wait "$pid" || code=$?
  if [ "$code" -ne 0 ]; then
    echo "$name exited with status $code after SIGTERM" >&2
    return 1
  fi
}

# A fresh admin key in the documented format: rdev_<8 letters or digits>_<32+ letters or digits>.
new_admin_key() {
  printf 'rdev_e2e%05d_%s\n' "$((RANDOM % 100000))" "$(od -An -tx1 -N20 /dev/urandom | tr -d ' \n')"
}

#!/usr/bin/env bash
# Runs the console's browser test: starts a fresh rdev-api (SQLite in a temporary directory,
# a random port), then drives it with headless Chromium. Screenshots land in target/browser/.
#   RDEV_BIN   the rdev-api binary (default: target/debug/rdev-api under CARGO_TARGET_DIR)
#   CHROMIUM   the browser (default: /usr/bin/chromium, Debian's `chromium` package)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
bin="${RDEV_BIN:-${CARGO_TARGET_DIR:-$repo/target}/debug/rdev-api}"
key="rdev_browser0_0123456789abcdefghijklmnopqrstuv"

(cd "$here" && npm ci --no-audit --no-fund --silent)

work="$(mktemp -d)"
server=""
cleanup() {
  if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

RDEV_LISTEN_ADDR=127.0.0.1:0 DATABASE_URL="sqlite://$work/rdev.db" RDEV_BOOTSTRAP_ADMIN_KEY="$key" \
  RDEV_LOG_FORMAT=json RDEV_DRAIN_DELAY_SECS=0 "$bin" serve 2>"$work/server.log" &
server=$!
address=""
for _ in $(seq 1 300); do
  address="$(sed -n 's/.*"message":"rdev-api listening".*"address":"\([^"]*\)".*/\1/p; s/.*"address":"\([^"]*\)".*"message":"rdev-api listening".*/\1/p' "$work/server.log" | head -n1)"
  [ -n "$address" ] && break
  kill -0 "$server" 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
  sleep 0.1
done
[ -n "$address" ] || { echo "the server did not start" >&2; cat "$work/server.log" >&2; exit 1; }

mkdir -p "$repo/target/browser"
RDEV_URL="http://$address" RDEV_API_KEY="$key" SCREENSHOT_DIR="$repo/target/browser" \
  node "$here/console.test.mjs"

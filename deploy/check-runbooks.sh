#!/usr/bin/env bash
# Every kubectl line of the runbooks (docs/operations/*.md) through the real kubectl: its syntax
# against an API server that is not there (a wrong flag, argument or patch body fails, a refused
# connection passes), its reads (get, logs) against a fake API server on 127.0.0.1 that holds
# the rendered prod overlay (a bad jsonpath, name or selector fails, and `logs -l` without
# --tail fails); and every curl line against what the manifests make reachable. The rules are in
# deploy/tools/check_runbooks.py. Called by deploy/validate.sh; standalone:
#   deploy/check-runbooks.sh [DOCS_DIR]
# Needs kubectl and python3 with PyYAML (PYTHON names another interpreter). Only 127.0.0.1.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
exec "${PYTHON:-python3}" "$root/deploy/tools/check_runbooks.py" "$root" "$@"

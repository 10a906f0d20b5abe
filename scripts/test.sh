#!/usr/bin/env bash
# The README's test command: set up (idempotent), then run the test suite.
# Slow suites (marked `slow`) run only with M2RL_SLOW=1; GPU tests run through the device tool.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
export PYTHONUNBUFFERED=1
set +e
.venv/bin/python -m pytest "$@"
code=$?
set -e
# pytest exits 5 when it collected nothing: that is a failure of this command, not a pass.
exit "$code"

#!/usr/bin/env bash
# The README's main-job command: set up (idempotent), then run the main job on the embedded
# default configuration (CPU, tiny M2 policy, local sandbox). Extra arguments go to the command.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
exec .venv/bin/m2rl train "$@"

#!/usr/bin/env bash
# Set up the environment if needed (tools/setup_env.sh), then run the test suite.
# Extra arguments go to pytest, e.g. tools/run_tests.sh -k weights -x
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$REPO/tools/setup_env.sh"
cd "$REPO"
exec "${MMPF_VENV:-$REPO/.venv}/bin/python" -m pytest tests "$@"

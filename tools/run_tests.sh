#!/usr/bin/env bash
# Set up the environment if needed (tools/setup_env.sh), then run the test suite.
# Extra arguments go to pytest: tools/run_tests.sh -k weights -x, or tools/run_tests.sh
# tests/test_demo.py (without a path, pytest.ini points pytest at tests/).
#
# The tests run in one pytest-xdist worker per core, up to 4 (MMPF_TEST_WORKERS=N to choose; 0 runs
# them in this process). Most of the suite's time is tools starting in processes of their own, each
# on one core, so two workers on two cores take about 60% of the time one does.
#
# On a GPU machine, tools/run_tests.sh --gpu [-k cuda ...] sets up with tools/setup_env.sh --gpu and
# runs the tests in that environment (PYTHON, default python3).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ "${1:-}" == --gpu ]]; then
    shift
    "$REPO/tools/setup_env.sh" --gpu
    PY=${PYTHON:-python3}
else
    "$REPO/tools/setup_env.sh"
    PY=${MMPF_VENV:-$REPO/.venv}/bin/python
fi
cd "$REPO"
cores=$(nproc)
workers=${MMPF_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}
exec "$PY" -m pytest -n "$workers" --dist worksteal "$@"

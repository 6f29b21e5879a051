#!/usr/bin/env bash
# The main job: set up the environment if needed, then train and evaluate PoolFormer-S12 RetinaNet on
# the bundled shapes data on this machine's CPU (about 15 minutes on 2 cores) and print the results.
#   tools/demo.sh [--task retinanet|mask_rcnn|fpn] [--work-dir DIR] [--cfg-options K=V ...]
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$REPO/tools/setup_env.sh"
exec "${MMPF_VENV:-$REPO/.venv}/bin/python" "$REPO/tools/demo.py" "$@"

#!/usr/bin/env bash
# What tools/analysis/gpu_checks.sh needs on a GPU machine that has PyTorch, timm and Triton but no
# network and none of OpenMMLab's packages (the H200 that sessions borrow): wheels for its Python,
# prepared on a machine with network access, in a folder the call carries along.
#
#   tools/analysis/gpu_kit.sh [DIR] [PYTHON_VERSION]      # default .whl and 3.12
#
# DIR gets mmengine, mmdet, mmsegmentation and mmpretrain with what they import that such a machine
# lacks, pycocotools and shapely built for PYTHON_VERSION, and mmcv 2.1.0 without its compiled ops
# (a pure-Python wheel built here from its source release: enough for the backbone, its tests and
# benchmarks; mmcv's CUDA ops, which the `models` and `dist` steps need, take
# `tools/setup_env.sh --gpu` there). A DIR inside the repository is added to .git/info/exclude: wheels
# never belong in git.
# Then, on the GPU machine, from the repository's root, with DIR carried:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site DIR/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
#   tools/analysis/gpu_checks.sh OUT_DIR tests profile bench
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DIR=${1:-.whl}
PYVER=${2:-3.12}
PY=${PYTHON:-$REPO/.venv/bin/python}
[[ -x "$PY" ]] || PY=python3
cd "$REPO"
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
case "$DIR/" in  # (inside the repository: kept out of git)
    "$REPO"/*) entry="/${DIR#"$REPO"/}/"
               grep -qxF "$entry" .git/info/exclude 2>/dev/null || echo "$entry" >> .git/info/exclude ;;
esac

# the versions that setup.py's ranges gave tools/setup_env.sh (setuptools < 82: mmengine 0.10 imports
# pkg_resources); the rest: what these import beyond the GPU image's packages (its list: the device
# tool's KINDS.md)
PACKAGES=(mmengine==0.10.7 mmdet==3.3.0 mmsegmentation==1.2.2 mmpretrain==1.2.0 'setuptools<82'
          addict yapf platformdirs termcolor terminaltables prettytable wcwidth ftfy mat4py
          modelindex ordered-set pycocotools shapely)
PLATFORMS=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    PLATFORMS+=(--platform "${tag}_x86_64")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
    --implementation cp "${PLATFORMS[@]}" -d "$DIR" "${PACKAGES[@]}"

# mmcv: no wheel for these PyTorch builds; without its ops it is pure Python
SDIST=${MMCV_SDIST:-${MMPF_CACHE:-$HOME/.cache/mmpoolformer}/src/mmcv-2.1.0.tar.gz}  # (setup_env.sh's)
[[ -f "$SDIST" ]] || "$PY" -m pip download -q --no-deps --no-binary=:all: -d "$(dirname "$SDIST")" \
    mmcv==2.1.0
MMCV_WITH_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DIR" "$SDIST"

printf '[gpu_kit] %s: %s\n' "$DIR" "$(ls "$DIR" | wc -l) wheels, $(du -sh "$DIR" | cut -f1)"

#!/usr/bin/env bash
# Make (or refresh) the project's environment.
#
#   tools/setup_env.sh            # a machine without a GPU; idempotent: does only what is missing
#   tools/setup_env.sh --gpu      # a machine with an NVIDIA GPU and a CUDA build of PyTorch installed
#
# Without --gpu: creates .venv/ in the repository (git-ignored) with PyTorch 2.14.1 + torchvision
# 0.29.1, mmcv 2.1.0 built from its source release with its compiled CPU ops, mmengine / mmdet /
# mmsegmentation from the package index and this package (editable, with its test extras).  mmcv has
# no wheel for this PyTorch, and building it takes 20-40 minutes on 2 cores, so the built wheel is
# cached outside the repository (MMPF_CACHE, default ~/.cache/mmpoolformer) and every later set-up
# installs it in seconds.
#
# With --gpu: everything goes into the environment of PYTHON (default: python3), the one that has
# your CUDA build of PyTorch, which is kept (no virtual environment is made: one made from a conda or
# venv interpreter would not see that environment's packages).  mmcv 2.1.0 is built with its CUDA ops
# for this machine's GPU architecture only (TORCH_CUDA_ARCH_LIST, read from the device unless set),
# cached per PyTorch build and architecture, and checked by running its CUDA ops.  Offline (a cluster node without internet): pip's own PIP_NO_INDEX=1 and PIP_FIND_LINKS=DIR
# (a folder of wheels: mmengine, mmdet, mmsegmentation, ...), and MMCV_SDIST=mmcv-2.1.0.tar.gz.
#
# Environment: MMPF_VENV (default <repo>/.venv; not with --gpu), MMPF_CACHE, PYTHON (default
# python3.11 or python3; with --gpu python3), MMCV_SDIST (mmcv's source archive; default: downloaded once into the cache),
# MAX_JOBS (parallel compiler jobs; default: all cores), MMPF_EXTRAS (this package's extras to install;
# default tests: the test suite's oracles and tools; empty: none).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${MMPF_VENV:-$REPO/.venv}
CACHE=${MMPF_CACHE:-$HOME/.cache/mmpoolformer}
TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
MMCV_VERSION=2.1.0

say() { printf '[setup_env] %s\n' "$*"; }
die() { printf '[setup_env] error: %s\n' "$*" >&2; exit 1; }

GPU=0
for arg in "$@"; do
    case "$arg" in
        --gpu) GPU=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$arg'; allowed: --gpu (a machine with an NVIDIA GPU), --help" ;;
    esac
done

if [[ -z "${PYTHON:-}" ]]; then
    if (( GPU )); then PYTHON=$(command -v python3); else PYTHON=$(command -v python3.11 || command -v python3); fi
fi

if (( GPU )); then
    # the CUDA build of PyTorch this machine has, and the architecture of its GPU
    read -r GPU_TORCH GPU_ARCH < <("$PYTHON" - <<'PY' 2>/dev/null || true
import torch
if torch.version.cuda and torch.cuda.is_available():
    major, minor = torch.cuda.get_device_capability()
    print(torch.__version__, f'{major}.{minor}')
PY
) || true
    [[ -n "${GPU_ARCH:-}" ]] || die "--gpu: $PYTHON has no CUDA build of PyTorch that sees a GPU \
($("$PYTHON" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "devices", torch.cuda.device_count())' 2>&1 | tail -n 1)); \
install one (https://pytorch.org/get-started/locally/) or set PYTHON to the interpreter that has it"
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$GPU_ARCH}
    say "GPU mode: PyTorch $GPU_TORCH from $PYTHON, mmcv's CUDA ops for architecture $TORCH_CUDA_ARCH_LIST"
fi

if (( GPU )); then
    PY=$PYTHON
    VENV=$("$PY" -c 'import sys; print(sys.prefix)')
    say "installing into $VENV, the environment of $PY"
elif [[ ! -x "$VENV/bin/python" ]]; then
    say "creating virtual environment $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
    PY="$VENV/bin/python"
else
    say "virtual environment $VENV exists"
    PY="$VENV/bin/python"
fi
# pip, without this machine's notes about local index folders that lack a package
pip_() {
    "$PY" -m pip --disable-pip-version-check "$@" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }
}

# Report whether an installed distribution has exactly the given version.
has_version() {
    [[ "$("$PY" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null)" == "$2" ]]
}

if (( GPU )); then
    WHEELS="$CACHE/wheels/torch-$GPU_TORCH-sm${TORCH_CUDA_ARCH_LIST//[^0-9]/}"
    MMCV_OPS=(MMCV_WITH_OPS=1 FORCE_CUDA=1)
    # (an mmcv built without CUDA has compiled ops too: its CUDA version says 'not available')
    OPS_CHECK='from mmcv.ops import get_compiling_cuda_version as v; assert v() != "not available"'
elif has_version torch "$TORCH_VERSION" && has_version torchvision "$TORCHVISION_VERSION"; then
    say "torch $TORCH_VERSION and torchvision $TORCHVISION_VERSION present"
else
    say "installing torch $TORCH_VERSION and torchvision $TORCHVISION_VERSION (local wheel files)"
    pip_ install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
fi
if (( ! GPU )); then
    WHEELS="$CACHE/wheels/torch-$TORCH_VERSION"
    MMCV_OPS=(MMCV_WITH_OPS=1)
    OPS_CHECK='import mmcv.ops'
fi

if has_version mmcv "$MMCV_VERSION" && "$PY" -c "$OPS_CHECK" 2>/dev/null; then
    say "mmcv $MMCV_VERSION with compiled ops present"
else
    mkdir -p "$WHEELS"
    wheel=$(ls "$WHEELS"/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -n 1 || true)
    if [[ -z "$wheel" ]]; then
        if (( GPU )); then
            say "building mmcv $MMCV_VERSION from source with its CPU and CUDA ops for $TORCH_CUDA_ARCH_LIST;"
        else
            say "building mmcv $MMCV_VERSION from source with its CPU ops (20-40 min on 2 cores);"
        fi
        say "  the wheel is cached in $WHEELS for every later set-up"
        # What the build imports, where it is missing. mmcv's setup.py imports pkg_resources,
        # which setuptools dropped in release 82 (and torch's own requirement may have upgraded
        # it), so that is pinned for the build; opencv only where no build of it is importable (a
        # GPU image may have the headless one, which pip does not count as opencv-python).
        needs=()
        "$PY" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) >= 82)' \
            2>/dev/null || needs+=('setuptools<82')
        for req in wheel ninja numpy packaging addict yapf cv2:opencv-python \
                   'mmengine:mmengine>=0.10,<0.11'; do
            "$PY" -c "import ${req%%:*}" 2>/dev/null || needs+=("${req#*:}")
        done
        (( ${#needs[@]} == 0 )) || pip_ install -q "${needs[@]}"
        sdist=${MMCV_SDIST:-$CACHE/src/mmcv-$MMCV_VERSION.tar.gz}
        if [[ ! -f "$sdist" ]]; then
            [[ -z "${MMCV_SDIST:-}" ]] || die "MMCV_SDIST=$MMCV_SDIST: no such file"
            mkdir -p "$CACHE/src"
            pip_ download -q --no-deps --no-binary mmcv --no-build-isolation -d "$CACHE/src" \
                "mmcv==$MMCV_VERSION"
        fi
        build=$(mktemp -d)
        trap 'rm -rf "$build"' EXIT
        tar -xzf "$sdist" -C "$build"
        # PyTorch >= 2.10 headers need C++20, but mmcv's setup.py hard-codes -std=c++14 / c++17 (for
        # the host compiler and nvcc alike).
        sed -i 's/-std=c++1[47]/-std=c++20/g' "$build/mmcv-$MMCV_VERSION/setup.py"
        # No build isolation: the build must see the torch it compiles against.
        started=$SECONDS
        env "${MMCV_OPS[@]}" MAX_JOBS=${MAX_JOBS:-$(nproc)} \
            "$PY" -m pip --disable-pip-version-check wheel -q --no-deps --no-build-isolation \
            -w "$WHEELS" "$build/mmcv-$MMCV_VERSION"
        say "mmcv built in $(( (SECONDS - started) / 60 )) min $(( (SECONDS - started) % 60 )) s"
        wheel=$(ls "$WHEELS"/mmcv-"$MMCV_VERSION"-*.whl | head -n 1)
    else
        say "installing cached mmcv wheel $(basename "$wheel")"
    fi
    pip_ install -q --no-deps --force-reinstall "$wheel"
fi
# pip takes half a minute to find everything present, so the install is redone only when what it
# reads changed: setup.py (dependencies), the version, or where the checkout is.
stamp="$VENV/.mmpoolformer-installed"
EXTRAS=${MMPF_EXTRAS-tests}
wanted=$(cat "$REPO/setup.py" "$REPO/mmpoolformer/version.py" <(echo "$REPO $EXTRAS") | sha256sum | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$wanted" ]] && "$PY" -c "import importlib.metadata as m; m.version('mmpoolformer')" 2>/dev/null; then
    say "mmpoolformer (editable) with its dependencies and ${EXTRAS:-no} extras present"
else
    say "installing mmpoolformer (editable) with its dependencies and ${EXTRAS:-no} extras"
    rm -f "$stamp"
    pip_ install -q -e "$REPO${EXTRAS:+[$EXTRAS]}"
    echo "$wanted" > "$stamp"
fi

MMPF_GPU=$GPU "$PY" - <<'PY'
import os

import mmcv, mmcv.ops, mmdet, mmengine, mmseg, torch
import mmpoolformer
from mmpoolformer.kernels import native
print(f'[setup_env] ready: torch {torch.__version__}, mmengine {mmengine.__version__}, '
      f'mmcv {mmcv.__version__} (ops compiled), mmdet {mmdet.__version__}, '
      f'mmseg {mmseg.__version__}, mmpoolformer {mmpoolformer.__version__}')
# the compiled CPU kernels, built here (once) rather than in the first training step
capability = torch.backends.cpu.get_cpu_capability()
state = 'built' if native.ops() is not None else 'unavailable: PyTorch operators instead'
print(f'[setup_env] compiled CPU kernels for {capability}: {state}')
if os.environ['MMPF_GPU'] == '1':
    # mmcv's CUDA ops, run: NMS keeps the boxes it should, RoIAlign gives what its CPU kernel gives
    boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 11., 11.], [50., 50., 60., 60.]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    keep = mmcv.ops.nms(boxes.cuda(), scores.cuda(), 0.5)[1].cpu().tolist()
    assert keep == [0, 2], f'mmcv.ops.nms on CUDA kept {keep}, not [0, 2]'
    feats = torch.randn(1, 4, 16, 16)
    rois = torch.tensor([[0., 1.5, 2.5, 9.5, 12.]])
    roi_align = mmcv.ops.RoIAlign((3, 3), 1.0, 2)
    diff = (roi_align(feats.cuda(), rois.cuda()).cpu() - roi_align(feats, rois)).abs().max().item()
    assert diff < 1e-5, f'mmcv.ops.RoIAlign on CUDA differs from its CPU kernel by {diff}'
    print(f'[setup_env] mmcv CUDA ops ran on {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})')
PY

#!/usr/bin/env bash
# Make (or refresh) the project's environment on a machine without a GPU.
#
#   tools/setup_env.sh            # idempotent: does only what is missing
#
# Creates .venv/ in the repository (git-ignored) with PyTorch 2.14.1 + torchvision 0.29.1, mmcv 2.1.0
# built from its source release with its compiled CPU ops, mmengine / mmdet / mmsegmentation from the
# package index and this package (editable, with its test extras).  mmcv has no wheel for this PyTorch,
# and building it takes 20-40 minutes on 2 cores, so the built wheel is cached outside the repository
# (MMPF_CACHE, default ~/.cache/mmpoolformer) and every later set-up installs it in seconds.
#
# Environment: MMPF_VENV (default <repo>/.venv), MMPF_CACHE, PYTHON (default python3.11 or python3).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${MMPF_VENV:-$REPO/.venv}
CACHE=${MMPF_CACHE:-$HOME/.cache/mmpoolformer}
TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
MMCV_VERSION=2.1.0

say() { printf '[setup_env] %s\n' "$*"; }

if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=$(command -v python3.11 || command -v python3)
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating virtual environment $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
else
    say "virtual environment $VENV exists"
fi
PY="$VENV/bin/python"
# pip, without this machine's notes about local index folders that lack a package
pip_() {
    "$PY" -m pip --disable-pip-version-check "$@" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }
}

# Report whether an installed distribution has exactly the given version.
has_version() {
    [[ "$("$PY" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null)" == "$2" ]]
}

if has_version torch "$TORCH_VERSION" && has_version torchvision "$TORCHVISION_VERSION"; then
    say "torch $TORCH_VERSION and torchvision $TORCHVISION_VERSION present"
else
    say "installing torch $TORCH_VERSION and torchvision $TORCHVISION_VERSION (local wheel files)"
    pip_ install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
fi

if has_version mmcv "$MMCV_VERSION" && "$PY" -c "import mmcv.ops" 2>/dev/null; then
    say "mmcv $MMCV_VERSION with compiled ops present"
else
    WHEELS="$CACHE/wheels/torch-$TORCH_VERSION"
    mkdir -p "$WHEELS"
    wheel=$(ls "$WHEELS"/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -n 1 || true)
    if [[ -z "$wheel" ]]; then
        say "building mmcv $MMCV_VERSION from source with its CPU ops (20-40 min on 2 cores);"
        say "  the wheel is cached in $WHEELS for every later set-up"
        # mmcv's setup.py imports pkg_resources, which setuptools dropped in release 82 (and torch's
        # own requirement may have upgraded it), so pin it for the build.
        pip_ install -q 'setuptools<82' wheel ninja numpy packaging addict yapf opencv-python \
            'mmengine>=0.10,<0.11'
        build=$(mktemp -d)
        trap 'rm -rf "$build"' EXIT
        pip_ download -q --no-deps --no-binary mmcv --no-build-isolation -d "$build" \
            "mmcv==$MMCV_VERSION"
        tar -xzf "$build/mmcv-$MMCV_VERSION.tar.gz" -C "$build"
        # PyTorch >= 2.10 headers need C++20, but mmcv's setup.py hard-codes -std=c++14 / c++17.
        sed -i 's/-std=c++1[47]/-std=c++20/g' "$build/mmcv-$MMCV_VERSION/setup.py"
        # No build isolation: the build must see the torch it compiles against.
        MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
            pip_ wheel -q --no-deps --no-build-isolation -w "$WHEELS" "$build/mmcv-$MMCV_VERSION"
        wheel=$(ls "$WHEELS"/mmcv-"$MMCV_VERSION"-*.whl | head -n 1)
    else
        say "installing cached mmcv wheel $(basename "$wheel")"
    fi
    pip_ install -q --no-deps "$wheel"
fi

# pip takes half a minute to find everything present, so the install is redone only when what it
# reads changed: setup.py (dependencies), the version, or where the checkout is.
stamp="$VENV/.mmpoolformer-installed"
wanted=$(cat "$REPO/setup.py" "$REPO/mmpoolformer/version.py" <(echo "$REPO") | sha256sum | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$wanted" ]] && "$PY" -c "import importlib.metadata as m; m.version('mmpoolformer')" 2>/dev/null; then
    say "mmpoolformer (editable) with its dependencies and test extras present"
else
    say "installing mmpoolformer (editable) with its dependencies and test extras"
    rm -f "$stamp"
    pip_ install -q -e "$REPO[tests]"
    echo "$wanted" > "$stamp"
fi

"$PY" - <<'PY'
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
PY

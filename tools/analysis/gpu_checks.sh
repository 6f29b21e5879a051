#!/usr/bin/env bash
# The checks and measurements behind the README's GPU section, in one run on a CUDA machine:
#
#   tools/analysis/gpu_checks.sh OUT_DIR [STEP ...]
#
# Steps (all by default, in this order):
#   tests     the CUDA tests (pytest -k cuda): kernels and backbones against float64, autocast steps
#   profile   tools/analysis/gpu_profile.py at 2x3x800x1216 under bf16, with torch.compile
#   bench     tools/analysis/benchmark.py --device cuda at the detection (2x3x800x1216) and the
#             segmentation (4x3x512x512) shapes, in fp32, bf16 and fp16
#   models    RetinaNet, Mask R-CNN and Semantic FPN with S12 (benchmark.py --configs), our backbone
#             against mmpretrain's in its place, fp32 and fp16; needs mmcv's CUDA ops
#             (tools/setup_env.sh --gpu)
#   dist      tools/dist_train.sh CONFIG 1 and tools/dist_test.sh CONFIG CHECKPOINT 1 with the RetinaNet
#             demo config (two epochs on the shapes data, generated into data/shapes if missing);
#             needs mmcv's CUDA ops too
#
# Each step writes its log (and JSON) into OUT_DIR, stops at its time limit (STEP_TIMEOUT seconds,
# default 600) and, if it fails, is reported while the next one runs; the exit status is the number
# of steps that failed. PYTHON (default python3) is the interpreter of the environment to use.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
OUT=${1:?usage: tools/analysis/gpu_checks.sh OUT_DIR [tests profile bench models dist]}
shift
STEPS=("$@")
(( ${#STEPS[@]} )) || STEPS=(tests profile bench models dist)
PY=${PYTHON:-python3}
LIMIT=${STEP_TIMEOUT:-600}
mkdir -p "$OUT"
cd "$REPO"
export PYTHONUNBUFFERED=1

failed=0
step() {  # step NAME COMMAND...: run it under the time limit, its output into OUT/NAME.log
    local name=$1 started=$SECONDS
    shift
    timeout "$LIMIT" "$@" > "$OUT/$name.log" 2>&1
    local status=$?
    printf '[gpu_checks] %-28s exit %3d  %4d s\n' "$name" "$status" $(( SECONDS - started ))
    (( status == 0 )) || failed=$(( failed + 1 ))
}

"$PY" - > "$OUT/machine.txt" 2>&1 <<'PY'
import torch
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'cuDNN', torch.backends.cudnn.version())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f'GPU {i}: {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB')
PY
cat "$OUT/machine.txt"

for name in "${STEPS[@]}"; do
    case "$name" in
    tests)
        step tests "$PY" -m pytest -q -p no:cacheprovider -rfE -k cuda \
            tests/test_models/test_cuda.py tests/test_kernels
        grep -E '^(FAILED|ERROR)|passed|failed' "$OUT/tests.log" | tail -n 20 ;;
    profile)
        step profile "$PY" tools/analysis/gpu_profile.py --size 800 1216 --amp bf16 --compile --cuda-graphs \
            --json "$OUT/profile.json"
        grep -E 'ms of GPU kernels|torch.compile|CUDA graphs|pooling, worst' "$OUT/profile.log" ;;
    bench)
        for spec in "det 2 800 1216" "seg 4 512 512"; do
            read -r shape batch h w <<< "$spec"
            for amp in fp32 bf16 fp16; do
                args=(--device cuda --batch "$batch" --size "$h" "$w" --repeats 9)
                [[ $amp == fp32 ]] || args+=(--amp "$amp")
                step "bench_${shape}_$amp" "$PY" tools/analysis/benchmark.py "${args[@]}" \
                    --json "$OUT/bench_${shape}_$amp.json"
                grep -E '^(ours|timm|mmpretrain|floor) |round by round' "$OUT/bench_${shape}_$amp.log"
            done
        done ;;
    models)
        for amp in fp32 fp16; do
            args=(--device cuda --impls ours --no-memory --repeats 20 --configs
                  configs/detection/retinanet_poolformer_s12.py
                  configs/detection/mask_rcnn_poolformer_s12.py
                  configs/segmentation/fpn_poolformer_s12.py --config-backbones ours mmpretrain)
            [[ $amp == fp32 ]] || args+=(--amp "$amp")
            step "models_$amp" "$PY" tools/analysis/benchmark.py "${args[@]}" \
                --json "$OUT/models_$amp.json"
            grep -A 8 '^Whole models' "$OUT/models_$amp.log"
        done ;;
    dist)
        "$PY" -c 'from mmpoolformer.demo import generate, is_generated
is_generated("data/shapes") or generate("data/shapes")'
        cfg=configs/demo/retinanet_poolformer_s12_shapes.py
        step dist_train env PYTHON="$PY" tools/dist_train.sh "$cfg" 1 --work-dir "$OUT/dist" \
            --cfg-options train_cfg.max_epochs=2 train_cfg.val_interval=2 default_hooks.checkpoint.interval=2
        step dist_test env PYTHON="$PY" tools/dist_test.sh "$cfg" "$OUT/dist/epoch_2.pth" 1 \
            --work-dir "$OUT/dist"
        grep -hE 'coco/bbox_mAP:|Epoch\((val|test)\)' "$OUT/dist_train.log" "$OUT/dist_test.log" | tail -n 4 ;;
    *)
        echo "[gpu_checks] unknown step '$name'; allowed: tests profile bench models dist" >&2
        exit 2 ;;
    esac
done
exit "$failed"

#!/usr/bin/env bash
# Issue 18, the GPU measurement: training images/s of train.py (DETR-R50, the official multi-scale
# augmentation, a generated COCO-like set) with the official settings (fp32, no compile) against
# speed=gpu, interleaved, then one lever at a time and a two-seed learning-curve comparison while the
# time budget lasts. BENCHMARKS.md, "GPU end-to-end (issue 18)", says what each lever is.
#
#   bash benchmarks/gpu_train_e2e.sh prepare   # here, with pip and the network: the wheels the GPU
#                                              # image lacks, into .whl/ (then: echo /.whl/ >> .git/info/exclude)
#   bash benchmarks/gpu_train_e2e.sh run       # on the lent GPU machine (device run, carry [".whl"])
#
# `run` writes under $OUT (or ./gpu_e2e_out), at most 8 files, nothing deeper:
#   env.txt            GPU, driver, versions, the measured bf16 matrix-product peak (8192^3)
#   summary_main.json  baseline vs speed=gpu: medians per setting, speed-up, model TFLOP/s, fraction of peak
#   runs_main.tsv      one row per run: images/s, where the time went, memory, compilations, GPU busy
#   summary_levers.json, runs_levers.tsv   speed=gpu with one lever changed (if time was left)
#   runs.jsonl         every run's full figures (both stages)
#   results.tar.gz     train.py logs, each run's e2e.json and config, the curves' run folders (metrics.csv)
#   script.log         this script's output
# Knobs (environment): BUDGET_S (seconds for the whole command, default 480: the machine's start and
# the transfers come on top of it), STAGES ("main levers curves"), BATCH (4), STEPS (100 timed steps per
# run), WARMUP (40), ROUNDS (2: baseline, fast, fast, baseline), TRAIN_IMAGES (480), VAL_IMAGES (48),
# CURVE_EPOCHS (6), CURVE_SEEDS ("1 2"); for a dry run of the plumbing on a CPU: DEVICE=cpu and
# EXTRA="overrides for every run" (a tiny model and small scales, as tests/tools/test_bench.py uses).
set -uo pipefail

cd "$(dirname "$0")/.."
WHEELS=(hydra-core==1.3.8 omegaconf==2.3.1 pycocotools==2.0.11 faster-coco-eval==1.8.0)

prepare() {
    mkdir -p .whl
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}" || exit 1
    # antlr4-python3-runtime 4.9.3 (omegaconf's parser) is published as source only: a pure-Python wheel.
    python3 -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3 || exit 1
    ls -la .whl
    echo "Now: echo /.whl/ >> .git/info/exclude  (so .whl travels only when a device run carries it)"
}

run() {
    local start=$SECONDS budget=${BUDGET_S:-480} stages=${STAGES:-main levers curves}
    local batch=${BATCH:-4} steps=${STEPS:-100} warmup=${WARMUP:-40} rounds=${ROUNDS:-2}
    local out=${OUT:-$PWD/gpu_e2e_out} work=/tmp/gpu_e2e
    mkdir -p "$out" "$work"
    exec > >(tee "$out/script.log") 2>&1
    left() { echo $((budget - (SECONDS - start))); }
    echo "== $(date -u) budget ${budget} s, stages: $stages"

    if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || exit 1
        export PYTHONPATH=/tmp/site
    fi
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 DETR_LIGHTNING_OFFLINE=1
    export WANDB_MODE=disabled
    if ! python3 -c "import detr_lightning.training, detr_lightning.tools.bench" 2>"$work/import.err"; then
        cat "$work/import.err"
        echo "missing packages: run 'bash benchmarks/gpu_train_e2e.sh prepare' here and carry .whl"
        exit 1
    fi

    {   nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
        nproc
        python3 - <<'EOF'
import importlib.metadata as md, time, torch
for name in ("torch", "torchvision", "lightning", "hydra-core", "torchmetrics", "faster-coco-eval", "triton"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "absent")
if not torch.cuda.is_available():
    raise SystemExit("no CUDA device: no peak measured")
print("cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), torch.cuda.get_device_name())
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    a @ b
torch.cuda.synchronize()
begin = time.perf_counter()
for _ in range(10):
    a @ b
torch.cuda.synchronize()
print(f"bf16_matmul_tflops {10 * 2 * 8192**3 / (time.perf_counter() - begin) / 1e12:.1f}")
EOF
    } > "$out/env.txt" 2>&1
    cat "$out/env.txt"
    local peak
    peak=$(awk '/^bf16_matmul_tflops/ {print $2}' "$out/env.txt")

    local data=$work/coco_like
    python3 -m detr_lightning.data.demo "$data" --realistic --num-train "${TRAIN_IMAGES:-480}" \
        --num-val "${VAL_IMAGES:-48}" --num-test 2 --processes "$(($(nproc) - 2))"
    echo "== data ready at $((SECONDS - start)) s"

    local device=${DEVICE:-cuda} trainer=gpu extra override
    [[ $device == cpu ]] && trainer=cpu
    read -r -a extra <<< "${EXTRA:-}"
    local common=(--device "$device" --data "$data" --steps "$steps" --warmup-steps "$warmup"
        --profile-steps 5 --flop-steps 2 --run-timeout 300 --override "data.batch_size=$batch"
        ${peak:+--peak-tflops "$peak"})
    for override in "${extra[@]}"; do common+=(--override "$override"); done

    if [[ " $stages " == *" main "* ]]; then
        python3 -m detr_lightning.tools.bench train-e2e "${common[@]}" --out-dir "$work/main" \
            --rounds "$rounds" --budget-s "$(($(left) - 20))" \
            --setting "baseline=" --setting "fast=speed=gpu"
        cp "$work/main/summary.json" "$out/summary_main.json"
        cp "$work/main/runs.tsv" "$out/runs_main.tsv"
        cat "$work/main/runs.jsonl" >> "$out/runs.jsonl"
    fi

    # One lever changed at a time from speed=gpu, most telling first, while the budget lasts.
    if [[ " $stages " == *" levers "* ]] && (($(left) > 150)); then
        python3 -m detr_lightning.tools.bench train-e2e "${common[@]}" --out-dir "$work/levers" \
            --rounds 1 --budget-s "$(($(left) - 20))" \
            --setting "eager=speed=gpu speed.compile=false" \
            --setting "no_cudagraphs=speed=gpu speed.compile_mode=default" \
            --setting "no_buckets=speed=gpu data.pad_to_multiple=null" \
            --setting "fp32_compiled=speed=gpu trainer.precision=32-true" \
            --setting "unfused_adamw=speed=gpu optimizer.fused=null" \
            --setting "two_workers=speed=gpu data.num_workers=2" \
            --setting "buckets_256=speed=gpu data.pad_to_multiple=256" \
            --setting "whole_model=speed=gpu speed.compile_target=model speed.compile_dynamic=false speed.compile_recompile_limit=64"
        cp "$work/levers/summary.json" "$out/summary_levers.json"
        cp "$work/levers/runs.tsv" "$out/runs_levers.tsv"
        cat "$work/levers/runs.jsonl" >> "$out/runs.jsonl"
    fi

    # The demo's loss and val mAP over the same epochs: fp32 baseline and speed=gpu, two seeds each.
    if [[ " $stages " == *" curves "* ]]; then
        local seed setting
        for seed in ${CURVE_SEEDS:-1 2}; do
            for setting in baseline fast; do
                (($(left) > 90)) || { echo "== curves: no time left for $setting seed $seed"; continue; }
                local fast=()
                [[ $setting == fast ]] && fast=(speed=gpu)
                timeout "$(($(left) - 30))" python3 train.py experiment=demo "trainer=$trainer" "seed=$seed" \
                    "trainer.max_epochs=${CURVE_EPOCHS:-6}" callbacks.progress_bar=null "${fast[@]}" \
                    "${extra[@]}" "paths.data_dir=$work/data" "hydra.run.dir=$work/curves/${setting}_s$seed" \
                    > "$work/curves_${setting}_s$seed.log" 2>&1
                echo "== curves: $setting seed $seed exit $? at $((SECONDS - start)) s"
            done
        done
    fi

    tar -czf "$out/results.tar.gz" -C "$work" --exclude='*.ckpt' --exclude='*/runs/*/plots' \
        $(cd "$work" && ls -d main levers curves curves_*.log 2>/dev/null)
    echo "== done in $((SECONDS - start)) s; files in $out:"
    ls -la "$out"
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: bash benchmarks/gpu_train_e2e.sh prepare|run"; exit 2 ;;
esac

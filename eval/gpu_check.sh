#!/bin/bash
# The CUDA checks, in one go, for a machine with an NVIDIA GPU and hemcap importable:
#   1. tests/test_train.py with the GPU visible (accelerate picks it up);
#   2. LoRA through `accelerate launch hemcap/train.py --lora` (60 steps, bf16);
#   3. a sweep of quickstart recipes (configs/quickstart.yaml and variants), trained side by side
#      on the one GPU for at most 3 minutes each, then `hemcap eval` (on the GPU) on 1,000
#      held-out synthetic cells: 5x the quickstart's test split, so the noise is ~0.2 points;
#   4. eval/bench_lora_memory.py --device cuda and eval/bench_captioning.py on BLIP-base.
# Its first form (six variants) took 6.3 minutes on one H100 (2026-11-27, BENCHMARKS.md).
#   bash eval/gpu_check.sh [OUT_DIR]     # from the repository root; logs and reports land in OUT_DIR (default gpu_check/)
set -u
OUT_DIR=${1:-gpu_check}
WORK=$(mktemp -d)
mkdir -p "$OUT_DIR"
LOG=$OUT_DIR/log.txt
START=$(date +%s)
say() { echo "=== $(( $(date +%s) - START ))s $*" | tee -a "$LOG"; }

say versions
python3 -c "import torch, transformers, peft, accelerate; print(torch.__version__, transformers.__version__, peft.__version__, accelerate.__version__, torch.cuda.get_device_name())" >> "$LOG" 2>&1 || { tail -3 "$LOG"; exit 1; }

say data
python3 -c "from hemcap import recipes; recipes.prepare_synthetic('$WORK/data', n_train=4000, n_val=100, n_test=1000, size=96, seed=0)" \
    > "$WORK/data.log" 2>&1 || { tail "$WORK/data.log" | tee -a "$LOG"; exit 1; }

train_and_eval() {  # name, then --set overrides
    local name=$1; shift
    OMP_NUM_THREADS=2 python3 hemcap/train.py --config configs/quickstart.yaml --set "data.path=$WORK/data" \
        --set "train.output_dir=$WORK/$name" --set train.max_minutes=3.0 "$@" > "$WORK/train_$name.log" 2>&1
    OMP_NUM_THREADS=2 python3 -m hemcap.cli eval --model "$WORK/$name/model" --data "$WORK/data" --split test \
        --out "$OUT_DIR/$name" --no-meteor > "$WORK/eval_$name.log" 2>&1
}
say sweep
train_and_eval shipped &
train_and_eval lr_half --set train.lr=1.0e-3 &
train_and_eval no_augment --set augment.rotate90=false --set augment.flip=false &
train_and_eval steps_6000 --set train.max_steps=6000 &
train_and_eval vision_6_layers --set model.vision_config.num_hidden_layers=6 &

say tests
timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_train.py > "$OUT_DIR/tests.txt" 2>&1
tail -3 "$OUT_DIR/tests.txt" | tee -a "$LOG"

say "LoRA through accelerate launch"
timeout 120 accelerate launch --num_processes 1 --mixed_precision bf16 hemcap/train.py --lora \
    --config configs/quickstart.yaml --set "data.path=$WORK/data" --set "train.output_dir=$WORK/lora" \
    --set train.max_steps=60 --set train.eval_every=60 > "$WORK/lora.log" 2>&1
echo "exit $?; $(grep -c 'model written' "$WORK/lora.log") model written" | tee -a "$LOG"

wait
say "sweep done"
for log in "$WORK"/train_*.log; do tr '\r' '\n' < "$log" | grep -E "stopping at|model written|Error" | tail -2; done | tee -a "$LOG"
python3 - "$OUT_DIR" <<'PY' | tee -a "$LOG"
import json, sys
from pathlib import Path
for metrics in sorted(Path(sys.argv[1]).glob("*/metrics.json")):
    faith = json.loads(metrics.read_text())["faithfulness"]
    fields = {name: round(100 * f["accuracy"], 1) for name, f in faith["fields"].items()}
    print(f"{metrics.parent.name}: mean attribute accuracy {100 * faith['attribute_mean']['accuracy']:.1f} %; {fields}")
PY

say benches
timeout 120 python3 eval/bench_lora_memory.py --device cuda 2>&1 | tail -8 | tee -a "$LOG"
timeout 120 python3 eval/bench_captioning.py --size base --images 64 2>&1 | tail -6 | tee -a "$LOG"
say end
rm -rf "$WORK"

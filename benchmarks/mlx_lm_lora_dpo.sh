#!/bin/sh
# mlx-lm-lora's DPO (PyPI mlx-lm-lora) on the same model, data, beta, seed and batch as gmt-mlx's,
# for issue 15's side-by-side: its per-step loss and step time, as JSON lines.
#
#   python3 -m venv /work/venv-lora && /work/venv-lora/bin/pip install mlx-lm-lora "mlx[cpu]"   # once, NOT in gmt-mlx's venv
#   sh benchmarks/mlx_lm_lora_dpo.sh                       # full fine-tune, 10 steps, batch 4, beta 0.1, seed 0
#   TRAIN_TYPE=lora ITERS=10 sh benchmarks/mlx_lm_lora_dpo.sh
#
# Settings (environment variables, defaults in brackets):
#   LORA_PY      python of the venv that has mlx-lm-lora          [/work/venv-lora/bin/python]
#   GMT_PY       python of gmt-mlx's venv (only to find the model) [/work/venv/bin/python]
#   MODEL        HF model folder                                  [smollm2-135m resolved by gmt_mlx.models]
#   DATA         folder with train/valid/test.jsonl (prompt/chosen/rejected strings) [examples/data/prefs]
#   TRAIN_TYPE   full | lora | dora                              [full]
#   ITERS [10]  BATCH [4]  BETA [0.1]  SEED [0]  LR [1e-5]  LOSS [sigmoid]  VAL_BATCHES [4]
#   LORA_RANK [8]  LORA_SCALE [20.0] (mlx-lm-lora's default is 10; 20 is gmt-mlx's)
#   MAX_SEQ_LENGTH [2048]
#   OUT          where the JSON lines, the log and the (discarded) weights go [/tmp/mlx_lm_lora_dpo]
#   RUN_GMT=1    also run the matching gmt-mlx finetune (GMT_METHOD [full|lora as TRAIN_TYPE], MASK_RATIO)
#                right after, into OUT/gmt-METHOD, and print its per-step loss and step time
#   BLAS         a shared library preloaded as MLX's BLAS on Linux, as gmt-mlx does by itself
#                [Debian's libopenblas0-pthread when present; "reference" to keep MLX's own]
#
# What it runs: mlx-lm-lora's own CLI entry (mlx_lm_lora.train: build_parser, CONFIG_DEFAULTS, run)
# with the flags printed as "command:", through a small wrapper that (1) adds the missing
# "max_recommended_working_set_size" to mx.device_info() (its trainers call
# mx.set_wired_limit(mx.device_info()["max_recommended_working_set_size"]), a KeyError on Linux CPU;
# 0 is what set_wired_limit accepts there, a no-op) and (2) passes a TrainingCallback that writes
# every report (--steps-per-report 1: one per step) to OUT/<train_type>.jsonl with full precision.
# fuse and save_every are only settable in its YAML config: the wrapper writes one (fuse: false,
# save_every > iters) so no merged model is written.
#
# The gmt-mlx run that matches it (same model, data, beta, seed, batch, lr, constant lr, Adam,
# no clipping) is printed as "gmt-mlx:" at the end; see the notes printed there for what cannot
# be aligned (data order, the reference model, LoRA defaults).
set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)
LORA_PY=${LORA_PY:-/work/venv-lora/bin/python}
GMT_PY=${GMT_PY:-/work/venv/bin/python}
DATA=${DATA:-$ROOT/examples/data/prefs}
TRAIN_TYPE=${TRAIN_TYPE:-full}
ITERS=${ITERS:-10}
BATCH=${BATCH:-4}
BETA=${BETA:-0.1}
SEED=${SEED:-0}
LR=${LR:-1e-5}
LOSS=${LOSS:-sigmoid}
VAL_BATCHES=${VAL_BATCHES:-4}
LORA_RANK=${LORA_RANK:-8}
LORA_SCALE=${LORA_SCALE:-20.0}
MAX_SEQ_LENGTH=${MAX_SEQ_LENGTH:-2048}
OUT=${OUT:-/tmp/mlx_lm_lora_dpo}

if [ -z "${MODEL:-}" ]; then
    MODEL=$("$GMT_PY" -c "from gmt_mlx.models.resolve import resolve_model; print(resolve_model('smollm2-135m'))")
fi
if [ "$(uname -s)" = Linux ] && [ "${BLAS:-}" != reference ]; then
    BLAS=${BLAS:-/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0}
    if [ -f "$BLAS" ]; then
        export LD_PRELOAD="$BLAS${LD_PRELOAD:+:$LD_PRELOAD}"
    else
        echo "note: $BLAS not found: mlx-lm-lora runs on MLX's reference BLAS (~17x slower steps than gmt-mlx's OpenBLAS)" >&2
    fi
fi

mkdir -p "$OUT"
RUN="$OUT/$TRAIN_TYPE"
rm -rf "$RUN.adapters"
CONFIG="$OUT/$TRAIN_TYPE.yaml"
cat > "$CONFIG" <<EOF
fuse: false
save_every: 1000000
lora_parameters: {rank: $LORA_RANK, dropout: 0.0, scale: $LORA_SCALE}
EOF

set -- --model "$MODEL" --data "$DATA" --train --train-mode dpo --train-type "$TRAIN_TYPE" \
    --dpo-cpo-loss-type "$LOSS" --beta "$BETA" --seed "$SEED" --batch-size "$BATCH" --iters "$ITERS" \
    --learning-rate "$LR" --optimizer adam --num-layers -1 --max-seq-length "$MAX_SEQ_LENGTH" \
    --steps-per-report 1 --steps-per-eval "$ITERS" --val-batches "$VAL_BATCHES" \
    --adapter-path "$RUN.adapters" -c "$CONFIG"
echo "command: LD_PRELOAD=${LD_PRELOAD:-} $LORA_PY -m mlx_lm_lora.train $*"
echo "config ($CONFIG): $(tr '\n' ' ' < "$CONFIG")"

JSONL="$RUN.jsonl" "$LORA_PY" - "$@" <<'PY' 2>&1 | tee "$RUN.log"
import json, os, sys, time

import mlx.core as mx

_device_info = mx.device_info
def device_info():
    info = dict(_device_info())
    info.setdefault("max_recommended_working_set_size", 0)  # absent on Linux CPU; 0 = no wired limit
    return info
mx.device_info = device_info

from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm_lora import train as T

out = open(os.environ["JSONL"], "w")
last = [time.perf_counter()]

class Record(TrainingCallback):
    def on_train_loss_report(self, info):
        now = time.perf_counter()
        row = {"kind": "train", **{k: float(v) for k, v in info.items()}, "wall_since_last_report": now - last[0]}
        last[0] = now
        out.write(json.dumps(row) + "\n"); out.flush()

    def on_val_loss_report(self, info):
        row = {"kind": "valid", **{k: float(v) for k, v in info.items()}}
        out.write(json.dumps(row) + "\n"); out.flush()
        last[0] = time.perf_counter()

args = T.build_parser().parse_args(sys.argv[1:])
import yaml
with open(args.config) as f:
    for k, v in yaml.load(f, Loader=T.yaml_loader).items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
for k, v in T.CONFIG_DEFAULTS.items():
    if getattr(args, k, None) is None:
        setattr(args, k, v)
t0 = time.perf_counter()
T.run(args, training_callback=Record())
print(f"total wall time {time.perf_counter() - t0:.1f}s (load, data, validation, training)")
PY

"$LORA_PY" - "$RUN.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
train = [r for r in rows if r["kind"] == "train"]
valid = [r for r in rows if r["kind"] == "valid"]
for r in valid:
    print(f"valid @ {int(r['iteration'])}: loss {r['val_loss']:.5f}  accuracy {r['val_accuracies']:.3f}  margin {r['val_margins']:.4f}  ({r['val_time']:.1f}s)")
for r in train:
    print(f"step {int(r['iteration']):3d}: loss {r['train_loss']:.5f}  margin {r['train_margins']:.4f}  "
          f"step {1 / r['iterations_per_second']:.3f}s  tok/s {r['tokens_per_second']:.0f}  peak {r['peak_memory']:.2f} GB")
times = [1 / r["iterations_per_second"] for r in train[1:]]  # step 1 includes compilation
if times:
    print(f"step time, steps 2-{len(train)}: median {statistics.median(times):.3f}s, mean {statistics.mean(times):.3f}s")
PY

if [ "$TRAIN_TYPE" = full ]; then METHOD=${GMT_METHOD:-full}; ADAPTER=""; else METHOD=${GMT_METHOD:-$TRAIN_TYPE}; ADAPTER=" --lora-rank $LORA_RANK --lora-scale $LORA_SCALE"; fi
[ -n "${MASK_RATIO:-}" ] && ADAPTER="$ADAPTER --mask-ratio $MASK_RATIO"
GMT_RUN="$OUT/gmt-$METHOD"
# shellcheck disable=SC2086  # ADAPTER is a list of flags
set -- finetune --model "$MODEL" --data "$DATA" --train-mode dpo --method "$METHOD" --dpo-loss "$LOSS" \
    --beta "$BETA" --seed "$SEED" --batch-size "$BATCH" --iters "$ITERS" --learning-rate "$LR" --optimizer adam \
    --lr-schedule constant --warmup-steps 0 --grad-clip 0 $ADAPTER \
    --max-seq-length "$MAX_SEQ_LENGTH" --steps-per-report 1 --steps-per-eval "$ITERS" --val-batches "$VAL_BATCHES" \
    --samples 0 --out "$GMT_RUN" --overwrite
echo "gmt-mlx: gmt-mlx $*"
echo "(GMT_METHOD=gmt MASK_RATIO=R for GMT. Not aligned: the batches (mlx-lm-lora draws a random batch of" \
    "length-sorted neighbours each step), the reference (mlx-lm-lora runs a second model copy every step," \
    "gmt-mlx one pass over the splits before step 1), the validation pairs and weighting, LoRA's initial A)"
if [ "${RUN_GMT:-0}" = 1 ]; then
    GMT_BIN=$(dirname "$GMT_PY")/gmt-mlx
    start=$(date +%s)
    "$GMT_BIN" "$@" > "$GMT_RUN.log" 2>&1
    echo "gmt-mlx run: $(( $(date +%s) - start ))s end to end, log $GMT_RUN.log"
    "$GMT_PY" - "$GMT_RUN/metrics.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
seen, train = set(), []
for r in rows:
    if r.get("type") == "train" and r["step"] not in seen:
        seen.add(r["step"]); train.append(r)
for r in rows:
    if r.get("type") == "eval":
        print(f"valid @ {r['step']}: loss {r['val_loss']:.5f}  reward accuracy {r['val_reward_accuracy']:.3f}  margin {r['val_reward_margin']:.4f}")
prev = None
times = []
for r in train:
    dt = r["wall_time"] - prev if prev is not None else None
    prev = r["wall_time"]
    if dt is not None:
        times.append(dt)
    print(f"step {r['step']:3d}: loss {r['loss']:.5f}  margin {r['reward_margin']:.4f}  step " + (f"{dt:.3f}s" if dt else "-"))
if times:
    print(f"step time, steps 2-{len(train)}: median {statistics.median(times):.3f}s, mean {statistics.mean(times):.3f}s")
PY
fi

#!/bin/sh
# The preference study of docs/EVIDENCE.md: DPO on SmolLM2-135M-Instruct (embedded) with
# examples/data/prefs (reasoning-gym chain_sum; chosen = the checker-verified answer,
# rejected = the model's own wrong answer): full / gmt at mask ratio 0.5 / random at 0.5 /
# lora, 3 seeds, each method's learning rate chosen on the VALIDATION split.
#
# Sized for about an hour of a 2-core CPU (~3-4 min per run: 16 steps, the reference pass
# over the 64 training pairs drawn and the 64 validation pairs, validation at steps 0/8/16,
# and the test evaluation):
#   1. seed 0 of full, gmt and lora at two peak learning rates each (6 runs); every run
#      validates, and each method keeps the rate with the lower final validation DPO loss.
#      These runs are also evaluated on test, but only validation chooses.
#   2. seeds 1 and 2 of every method at its chosen rate, and all three seeds of the random
#      control at gmt's rate (it differs from gmt only in which entries it drops).
#
#   sh studies/pref_study.sh      # re-running resumes: finished runs are reused
#
# Raw results: runs/pref_study/, copied to docs/evidence/dpo/; tables by
# studies/pref_study_tables.py, without retraining.
set -e
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT=runs/pref_study
"$PY" -c "import reasoning_gym" 2>/dev/null || "$PY" -m pip install -q "reasoning-gym>=0.1.25"

EVAL="--scorer reasoning_gym,number --max-tokens 16 --eval-limit 64"
cmp() { "$PY" -m gmt_mlx compare -c studies/pref_study.yaml --data examples/data/prefs $EVAL "$@"; }
slim() {  # drop weights and checkpoints of evaluated runs, keep the finished marker
  for d in "$1"/runs/*/; do
    [ -f "$d/eval.json" ] || continue
    rm -rf "$d/checkpoints"; find "$d/model" -type f ! -name config.json -delete 2>/dev/null || true
  done
}
share_base() {  # the base model's evaluation is the same for every comparison
  mkdir -p "$2/runs"; [ -f "$1/base_eval.json" ] && cp -n "$1/base_eval.json" "$2/" 2>/dev/null || true
}

# 1. Seed 0 at two learning rates per method.
cmp --out $OUT/sweep/lo --methods full,gmt,lora --mask-ratios 0.5 --seeds 0 --learning-rates full=1e-6,gmt=1e-6,lora=1e-5
slim $OUT/sweep/lo
share_base $OUT/sweep/lo $OUT/sweep/hi
cmp --out $OUT/sweep/hi --methods full,gmt,lora --mask-ratios 0.5 --seeds 0 --learning-rates full=5e-6,gmt=5e-6,lora=1e-4
slim $OUT/sweep/hi
LRS=$("$PY" studies/pref_study_tables.py --pick-lr $OUT)
echo "chosen learning rates (final validation DPO loss, seed 0): $LRS"

# 2. Seeds 1 and 2 at the chosen rates; the random control at gmt's rate, every seed.
share_base $OUT/sweep/lo $OUT/seeds
cmp --out $OUT/seeds --methods full,gmt,lora --mask-ratios 0.5 --seeds 1,2 --learning-rates $LRS
slim $OUT/seeds
share_base $OUT/sweep/lo $OUT/random
cmp --out $OUT/random --methods random --mask-ratios 0.5 --seeds 0,1,2 --learning-rates $LRS
slim $OUT/random

# 3. Raw results into docs/evidence/dpo/, then the tables.
"$PY" studies/pref_study_tables.py --collect $OUT docs/evidence/dpo
"$PY" studies/pref_study_tables.py docs/evidence/dpo

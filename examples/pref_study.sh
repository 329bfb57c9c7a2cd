#!/bin/sh
# The preference study of docs/EVIDENCE.md: DPO on SmolLM2-135M-Instruct (embedded) with
# examples/data/prefs (reasoning-gym chain_sum; chosen = the checker-verified answer,
# rejected = the model's own wrong answer), after a learning-rate sweep on the VALIDATION
# split: full / gmt at mask ratios 0.2 and 0.5 / random at 0.5 / lora, 3 seeds.
# The random control takes gmt's learning rate (it differs from gmt only in which
# entries it drops).
#
#   sh examples/pref_study.sh            # seeds 0,1,2 (seed-major: all of seed 0 first)
#   SEEDS=0 sh examples/pref_study.sh    # one seed; SEEDS=0,1,2 later reuses it
#
# Re-running resumes: finished runs are reused. Raw results: runs/pref_study/, copied to
# docs/evidence/dpo/; tables by examples/pref_study_tables.py, without retraining.
set -e
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
SEEDS="${SEEDS:-0,1,2}"
OUT=runs/pref_study
"$PY" -c "import reasoning_gym" 2>/dev/null || "$PY" -m pip install -q "reasoning-gym>=0.1.25"

EVAL="--scorer reasoning_gym,number --max-tokens 16 --eval-limit 64"
cmp() { "$PY" -m gmt_mlx compare -c examples/pref_study.yaml $EVAL "$@"; }
slim() {  # drop weights and checkpoints of evaluated runs, keep the finished marker
  for d in "$1"/runs/*/; do
    [ -f "$d/eval.json" ] || continue
    rm -rf "$d/checkpoints"; find "$d/model" -type f ! -name config.json -delete 2>/dev/null || true
  done
}

# 1. Learning-rate sweep, seed 0: the data folder has no test.jsonl, so compare evaluates
#    on the validation split; the lowest final validation DPO loss picks each method's rate.
mkdir -p $OUT/data/prefs_trainvalid
cp examples/data/prefs/train.jsonl examples/data/prefs/valid.jsonl $OUT/data/prefs_trainvalid/
for LR in lo mid hi; do
  case $LR in
    lo) LRS=full=1e-6,gmt=1e-6,lora=1e-5 ;;
    mid) LRS=full=3e-6,gmt=3e-6,lora=3e-5 ;;
    hi) LRS=full=1e-5,gmt=1e-5,lora=1e-4 ;;
  esac
  cmp --data $OUT/data/prefs_trainvalid --out $OUT/sweep/$LR --methods full,gmt,lora --mask-ratios 0.5 \
      --seeds 0 --learning-rates $LRS
  slim $OUT/sweep/$LR
done
LRS=$("$PY" examples/pref_study_tables.py --pick-lr $OUT)
echo "chosen learning rates: $LRS"

# 2. Seed-major, so that a cut-short study still has whole seeds.
for S in $(echo "$SEEDS" | tr , ' '); do
  UPTO=$(echo "$SEEDS" | tr , '\n' | awk -v s="$S" '{print} $0==s{exit}' | paste -sd, -)
  cmp --data examples/data/prefs --out $OUT/main --methods full,gmt,lora --mask-ratios 0.2,0.5 \
      --seeds "$UPTO" --learning-rates $LRS
  slim $OUT/main
  mkdir -p $OUT/random && cp -n $OUT/main/base_eval.json $OUT/random/ 2>/dev/null || true
  cmp --data examples/data/prefs --out $OUT/random --methods random --mask-ratios 0.5 \
      --seeds "$UPTO" --learning-rates $LRS
  slim $OUT/random
done

# 3. Raw results into docs/evidence/dpo/, then the tables.
"$PY" examples/pref_study_tables.py --collect $OUT docs/evidence/dpo
"$PY" examples/pref_study_tables.py docs/evidence/dpo

#!/bin/sh
# Compare plain fine-tuning (sft), gradient-mask tuning (gmt), its random-mask
# control and LoRA on reasoning-gym's chain_sum task with the embedded
# SmolLM2-135M-Instruct, two seeds each, at compare's default learning rates
# (full-weight methods 2e-5, LoRA 1e-4), then score greedy answers with
# reasoning-gym's own checker (and by last number). About 9 minutes on a
# 2-core Linux CPU with OpenBLAS. Extra arguments go to
# `gmt-mlx compare` (e.g. --seeds 0,1,2 or --methods sft,gmt,lora,random,dora).
# Running it again resumes an interrupted comparison (finished runs are reused).
# The recorded result is docs/compare_chain_sum/results.md.
set -e
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

# reasoning-gym scores the answers (the `tasks` extra); the data is already in
# examples/data/chain_sum (rebuild it with studies/compare_make_chain_sum.py).
"$PY" -c "import reasoning_gym" 2>/dev/null || "$PY" -m pip install -q "reasoning-gym>=0.1.25"

"$PY" -m gmt_mlx compare -c studies/compare_chain_sum.yaml --out runs/compare_chain_sum \
    --methods sft,gmt,random,lora --seeds 0,1 --mask-ratios 0.2 \
    --scorer reasoning_gym,number --eval-limit 24 --max-tokens 16 "$@"

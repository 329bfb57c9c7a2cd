#!/bin/sh
# mlx-lm-lora's GRPO (PyPI mlx-lm-lora 5.10.x) next to gmt-mlx's on the same model, prompts, reward and
# settings, for issue 23's side-by-side: step time and peak memory of each, as ratios of interleaved runs.
#
#   python3 -m venv /work/venv-lora && /work/venv-lora/bin/pip install "mlx-lm-lora>=5.10,<5.11" "mlx[cpu]" \
#       "reasoning-gym==0.1.25"                            # once, NOT in gmt-mlx's venv
#   sh benchmarks/mlx_lm_lora_grpo.sh                      # theirs, ours, theirs, ours: 6 steps each
#   ORDER="theirs-noref" ITERS=3 sh benchmarks/mlx_lm_lora_grpo.sh   # theirs without its second model (memory)
#
# Settings (environment variables, defaults in brackets):
#   LORA_PY   python of the venv that has mlx-lm-lora                [/work/venv-lora/bin/python]
#   GMT_PY    python of gmt-mlx's venv (the model, the data, our run) [/work/main/.venv/bin/python]
#   MODEL     HF model folder                                        [smollm2-135m resolved by gmt_mlx.models]
#   SRC       chat rows with "answer" and reasoning-gym "metadata"   [examples/data/chain_sum]
#   ORDER     the runs, in order: theirs | ours | theirs-noref (theirs with the reference model it loads
#             for GRPO replaced by None: only valid with BETA=0, where it is never run)
#                                                                    ["theirs ours theirs ours"]
#   ITERS [6]  BATCH [4]  GROUP [4] (--num-generations)  MAX_COMPLETION [16]  LR [1e-5]  TEMPERATURE [1.0]
#   BETA [0]  SEED [0]  LOSS [grpo] (both tools have grpo, bnpo, dr_grpo)  VAL_BATCHES [1]
#   SKIP_VAL  1: theirs runs no validation (it validates at step 1 and at the end, outside the timed steps;
#             ~35-50 s each here); 0: it does, on VAL_BATCHES batches    [1]
#   OURS_ARGS more gmt-mlx flags, appended (the last of a repeated flag wins), e.g.
#             "--batch-size 1 --grad-accumulation-steps 4": micro-batches of G rows, as theirs chunks its gradient
#   SUMMARIZE run names already in OUT (e.g. "theirs-1 ours-2"): no runs, only their summary
#   OUT       where the data, logs, JSON lines and the summary go    [/tmp/mlx_lm_lora_grpo]
#   BLAS      shared library preloaded as MLX's BLAS for theirs on Linux, as gmt-mlx does by itself
#             [Debian's libopenblas0-pthread when present; "reference" to keep MLX's own]
#
# What it runs for "theirs": mlx-lm-lora's own CLI entry (mlx_lm_lora.train: build_parser,
# CONFIG_DEFAULTS, run) with the flags printed as "command:", through a wrapper that
#  (1) adds "max_recommended_working_set_size" to mx.device_info() (absent on Linux CPU: KeyError;
#      0 = no wired limit), as benchmarks/mlx_lm_lora_dpo.sh does;
#  (2) sets GRPOTrainingArgs' top_p to 1.0 and top_k to 0 (off): train.py builds GRPOTrainingArgs without
#      passing them, so its CLI always samples with the dataclass defaults top_p 0.95, top_k 20; gmt-mlx's
#      defaults are top-p 1.0 and no top-k;
#  (3) registers a reward "reasoning_gym_score" (reward file REWARDS.py, --reward-functions-file): the
#      row's reasoning-gym checker on the completion text, clamped to [0, 1], 0 on a checker error: what
#      gmt-mlx's --reward reasoning_gym computes;
#  (4) wraps generate_grpo to count, on every rollout, whether decoding the sampled ids and encoding the
#      text again gives back the same ids (what a trainer that re-encodes completions would train on);
#  (5) with SKIP_VAL=1, passes val_dataset=None to train_grpo (no validation passes);
#  (6) writes every report (--steps-per-report 1) to OUT/theirs-N.jsonl.
# The data: SRC converted to its GRPO format ({"prompt", "answer", "system", "type"}) in OUT/data, with
# SmolLM2's default system prompt as "system" (its GRPODataset puts a system turn in every prompt, an
# "<answer>" instruction by default; gmt-mlx sends the chat template's own default system turn): the
# wrapper checks that both tools' prompt token ids are identical.
# Each run is wrapped in /usr/bin/time -v (peak RSS). Ours is `gmt-mlx finetune --train-mode grpo` with
# --optimizer adam --lr-schedule constant --grad-clip 0 (theirs: Adam, constant lr, no clipping).
set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)
LORA_PY=${LORA_PY:-/work/venv-lora/bin/python}
GMT_PY=${GMT_PY:-/work/main/.venv/bin/python}
SRC=${SRC:-$ROOT/examples/data/chain_sum}
ORDER=${ORDER:-theirs ours theirs ours}
ITERS=${ITERS:-6}
BATCH=${BATCH:-4}
GROUP=${GROUP:-4}
MAX_COMPLETION=${MAX_COMPLETION:-16}
LR=${LR:-1e-5}
TEMPERATURE=${TEMPERATURE:-1.0}
BETA=${BETA:-0}
SEED=${SEED:-0}
LOSS=${LOSS:-grpo}
VAL_BATCHES=${VAL_BATCHES:-1}
OUT=${OUT:-/tmp/mlx_lm_lora_grpo}
SKIP_VAL=${SKIP_VAL:-1}

if [ -z "${MODEL:-}" ]; then
    MODEL=$(cd "$ROOT" && "$GMT_PY" -c "from gmt_mlx.models.resolve import resolve_model; print(resolve_model('smollm2-135m'))")
fi
THEIR_PRELOAD=""
if [ "$(uname -s)" = Linux ] && [ "${BLAS:-}" != reference ]; then
    BLAS=${BLAS:-/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0}
    if [ -f "$BLAS" ]; then
        THEIR_PRELOAD="$BLAS"
    else
        echo "note: $BLAS not found: mlx-lm-lora runs on MLX's reference BLAS" >&2
    fi
fi
mkdir -p "$OUT/data"

# The data in mlx-lm-lora's GRPO format, and the prompt ids gmt-mlx sends (to check theirs against).
(cd "$ROOT" && "$GMT_PY" - "$SRC" "$OUT/data" "$MODEL" <<'PY'
import json, sys
from pathlib import Path
from mlx_lm.utils import load_tokenizer
from gmt_mlx.evaluation.evaluate import prompt_tokens
from gmt_mlx.data.prompts import grpo_prompt

src, out, model = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
tokenizer = load_tokenizer(Path(model))
ids = {}
for split in ("train", "valid", "test"):
    rows = [json.loads(l) for l in (src / f"{split}.jsonl").read_text().splitlines() if l.strip()]
    conv = []
    for row in rows:
        messages = grpo_prompt(row)
        assert len(messages) == 1 and messages[0]["role"] == "user", messages
        # The chat template's own default system turn (what gmt-mlx's prompt gets when it has none).
        system = tokenizer.decode(prompt_tokens(tokenizer, messages)).split("<|im_start|>system\n", 1)[1].split("<|im_end|>", 1)[0]
        conv.append({"prompt": messages[0]["content"], "answer": row["answer"], "system": system, "type": row.get("metadata")})
        ids.setdefault(split, []).append(prompt_tokens(tokenizer, messages))
    (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in conv))
(out.parent / "gmt_prompt_ids.json").write_text(json.dumps(ids))
print(f"data: {out} ({', '.join(f'{k} {len(v)}' for k, v in ids.items())} rows)")
PY
)

cat > "$OUT/REWARDS.py" <<'PY'
# gmt-mlx's --reward reasoning_gym, for mlx-lm-lora: the row's reasoning-gym checker on the completion text.
import math
import reasoning_gym
from mlx_lm_lora.trainer.grpo_reward_functions import register_reward_function

@register_reward_function()
def reasoning_gym_score(prompts, completions, answer, types=None):
    out = []
    for text, ans, meta in zip(completions, answer, types or [None] * len(completions)):
        meta = meta if isinstance(meta, dict) else {}
        try:
            value = float(reasoning_gym.get_score_answer_fn(meta["source_dataset"])(text, {"question": "", "answer": ans, "metadata": meta}))
        except Exception:
            value = 0.0
        out.append(min(max(value, 0.0), 1.0) if math.isfinite(value) else 0.0)
    return out
PY

cat > "$OUT/CONFIG.yaml" <<EOF
fuse: false
save_every: 1000000
EOF

theirs() {  # $1: run name, $2: 1 to drop the reference model
    rm -rf "$OUT/$1.adapters"
    set -- "$1" "$2" --model "$MODEL" --data "$OUT/data" --train --train-mode grpo --train-type full \
        --group-size "$GROUP" --max-completion-length "$MAX_COMPLETION" --temperature "$TEMPERATURE" \
        --beta "$BETA" --grpo-loss-type "$LOSS" --seed "$SEED" --batch-size "$BATCH" --iters "$ITERS" \
        --learning-rate "$LR" --optimizer adam --num-layers -1 --max-seq-length 2048 \
        --reward-functions-file "$OUT/REWARDS.py" --reward-functions reasoning_gym_score \
        --steps-per-report 1 --steps-per-eval 1000000 --val-batches "$VAL_BATCHES" \
        --adapter-path "$OUT/$1.adapters" -c "$OUT/CONFIG.yaml"
    name=$1; noref=$2; shift 2
    echo "command ($name): LD_PRELOAD=$THEIR_PRELOAD $LORA_PY -m mlx_lm_lora.train $*"
    LD_PRELOAD="$THEIR_PRELOAD" JSONL="$OUT/$name.jsonl" NOREF="$noref" SKIP_VAL="$SKIP_VAL" IDS="$OUT/gmt_prompt_ids.json" \
        /usr/bin/time -v -o "$OUT/$name.time" "$LORA_PY" - "$@" > "$OUT/$name.log" 2>&1 <<'PY'
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
from mlx_lm_lora.trainer import grpo_trainer as G

out = open(os.environ["JSONL"], "w")
def write(row):
    out.write(json.dumps(row) + "\n"); out.flush()

# (2) The sampling gmt-mlx uses by default: no top-p, no top-k (the CLI cannot set them for GRPO).
_orig_init = G.GRPOTrainingArgs.__init__
def _init(self, *a, **kw):
    kw.setdefault("top_p", 1.0)
    kw.setdefault("top_k", 0)
    _orig_init(self, *a, **kw)
G.GRPOTrainingArgs.__init__ = _init

# (4) Re-encoding check on every rollout, and the prompt ids against gmt-mlx's.
gmt_ids = {tuple(p) for split in json.load(open(os.environ["IDS"])).values() for p in split}
_generate = G.generate_grpo
def generate_grpo(model, tokenizer, prompt_tokens, *a, **kw):
    t0 = time.perf_counter()
    completions, texts, indices = _generate(model, tokenizer, prompt_tokens, *a, **kw)
    seconds = time.perf_counter() - t0
    same_prompt = sum(tuple(list(p)) in gmt_ids for p in prompt_tokens)
    changed = changed_tokens = total = 0
    eos = set(tokenizer.eos_token_ids)
    examples = []
    for ids in completions:
        ids = ids.tolist()
        body = ids[:-1] if ids and ids[-1] in eos else ids  # the text a reward sees (no stop token)
        again = tokenizer.encode(tokenizer.decode(body), add_special_tokens=False)
        total += 1
        if again != body:
            changed += 1
            changed_tokens += sum(a != b for a, b in zip(again, body)) + abs(len(again) - len(body))
            if len(examples) < 3:
                examples.append({"sampled": body, "reencoded": again})
    write({"kind": "rollout", "seconds": seconds, "prompts": len(prompt_tokens), "prompts_same_ids_as_gmt": same_prompt,
           "completions": total, "reencode_changed": changed, "reencode_changed_tokens": changed_tokens,
           "completion_tokens": int(sum(c.size for c in completions)), "examples": examples})
    return completions, texts, indices
G.generate_grpo = generate_grpo

if os.environ.get("SKIP_VAL") == "1":  # no validation passes (they run outside the timed steps anyway)
    _train_grpo = T.train_grpo
    T.train_grpo = lambda *a, **kw: _train_grpo(*a, **{**kw, "val_dataset": None})

if os.environ.get("NOREF") == "1":  # the reference model it loads for GRPO, never run at beta 0
    T.load_reference_model = lambda args: None

last = [time.perf_counter()]
class Record(TrainingCallback):
    def on_train_loss_report(self, info):
        now = time.perf_counter()
        write({"kind": "train", **{k: float(v) for k, v in info.items()}, "wall_since_last_report": now - last[0]})
        last[0] = now

    def on_val_loss_report(self, info):
        write({"kind": "valid", **{k: float(v) for k, v in info.items()}})
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
write({"kind": "end", "total_wall": time.perf_counter() - t0, "mx_peak_gb": mx.get_peak_memory() / 1e9})
PY
    echo "  $name: done ($(grep -c '"kind": "train"' "$OUT/$name.jsonl") steps), log $OUT/$name.log"
}

ours() {  # $1: run name
    name=$1
    set -- finetune --model "$MODEL" --data "$SRC" --train-mode grpo --method full --reward reasoning_gym \
        --num-generations "$GROUP" --max-completion-length "$MAX_COMPLETION" --temperature "$TEMPERATURE" \
        --top-p 1.0 --beta "$BETA" --loss-type "$LOSS" --seed "$SEED" --batch-size "$BATCH" --iters "$ITERS" \
        --learning-rate "$LR" --optimizer adam --lr-schedule constant --warmup-steps 0 --grad-clip 0 \
        --steps-per-report 1 --steps-per-eval 0 --val-batches "$VAL_BATCHES" --samples 0 --steps-per-save 0 \
        --out "$OUT/$name" --overwrite ${OURS_ARGS:-}
    echo "command ($name): gmt-mlx $*"
    (cd "$ROOT" && /usr/bin/time -v -o "$OUT/$name.time" "$(dirname "$GMT_PY")/gmt-mlx" "$@" > "$OUT/$name.log" 2>&1)
    echo "  $name: done, log $OUT/$name.log"
}

n=0
RUNS=""
[ -n "${SUMMARIZE:-}" ] && ORDER=""  # only the summary of runs already in OUT (their names, e.g. "theirs-1 ours-2")
for who in $ORDER; do
    n=$((n + 1))
    case $who in
        theirs) theirs "theirs-$n" 0 ;;
        theirs-noref) theirs "theirs-noref-$n" 1 ;;
        ours) ours "ours-$n" ;;
        *) echo "unknown run $who" >&2; exit 2 ;;
    esac
    RUNS="$RUNS $who-$n"
done
RUNS=${SUMMARIZE:-$RUNS}

"$GMT_PY" - "$OUT" $RUNS <<'PY'
import json, re, statistics, sys
from pathlib import Path

out, runs = Path(sys.argv[1]), sys.argv[2:]

def rss_gb(name):
    text = (out / f"{name}.time").read_text()
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) / 2**20

summary = {"runs": {}}
for name in runs:
    r = {"peak_rss_gb": rss_gb(name)}
    if name.startswith("theirs"):
        rows = [json.loads(l) for l in (out / f"{name}.jsonl").read_text().splitlines()]
        train = [x for x in rows if x["kind"] == "train"]
        rollouts = [x for x in rows if x["kind"] == "rollout"]
        # Step 1 compiles; its time also runs from before the first validation's end.
        r["step_seconds"] = [1 / x["iterations_per_second"] for x in train]
        r["mx_peak_gb"] = max([x["peak_memory"] for x in train] + [x.get("mx_peak_gb", 0) for x in rows if x["kind"] == "end"])
        r["reward_mean"] = statistics.mean(x["train_total_rewards_mean"] for x in train)
        r["completion_tokens_mean"] = statistics.mean(x["train_average_generated_tokens"] for x in train)
        r["rollouts"] = {"completions": sum(x["completions"] for x in rollouts),
                         "reencode_changed": sum(x["reencode_changed"] for x in rollouts),
                         "reencode_changed_tokens": sum(x["reencode_changed_tokens"] for x in rollouts),
                         "completion_tokens": sum(x["completion_tokens"] for x in rollouts),
                         "prompts": sum(x["prompts"] for x in rollouts),
                         "prompts_same_ids_as_gmt": sum(x["prompts_same_ids_as_gmt"] for x in rollouts),
                         "examples": [e for x in rollouts for e in x["examples"]][:4]}
    else:
        rows = [json.loads(l) for l in (out / name / "metrics.jsonl").read_text().splitlines()]
        train = [x for x in rows if x.get("type") == "train"]
        walls = [x["wall_time"] for x in train]
        r["step_seconds"] = [None] + [b - a for a, b in zip(walls, walls[1:])]
        r["rollout_plus_update_seconds"] = [x["rollout_seconds"] + x["update_seconds"] for x in train]
        r["mx_peak_gb"] = max(x["peak_memory_gb"] for x in train)
        r["reward_mean"] = statistics.mean(x["reward"] for x in train)
        r["completion_tokens_mean"] = statistics.mean(x["completion_length"] for x in train)
    timed = [s for s in r["step_seconds"][1:] if s is not None]
    r["step_seconds_median"] = statistics.median(timed) if timed else None
    summary["runs"][name] = r
    print(f"{name:16s} step median {r['step_seconds_median'] or float('nan'):6.2f}s (steps 2..)  peak RSS {r['peak_rss_gb']:.2f} GB  "
          f"MLX peak {r['mx_peak_gb']:.2f} GB  reward {r['reward_mean']:.3f}  completion tokens {r['completion_tokens_mean']:.1f}")

def med(prefix, key):
    vals = [r[key] for n, r in summary["runs"].items() if n.rsplit("-", 1)[0] == prefix and r[key] is not None]
    return statistics.median(vals) if vals else None

ours_step, theirs_step = med("ours", "step_seconds_median"), med("theirs", "step_seconds_median")
if ours_step and theirs_step:
    summary["ratios"] = {"step_ours_vs_theirs": ours_step / theirs_step,
                         "peak_rss_ours_vs_theirs": med("ours", "peak_rss_gb") / med("theirs", "peak_rss_gb"),
                         "mx_peak_ours_vs_theirs": med("ours", "mx_peak_gb") / med("theirs", "mx_peak_gb")}
    print("ratios (ours / theirs, medians over runs):", json.dumps(summary["ratios"]))
ro = [r["rollouts"] for r in summary["runs"].values() if "rollouts" in r]
if ro:
    c = sum(x["completions"] for x in ro); ch = sum(x["reencode_changed"] for x in ro)
    tok = sum(x["completion_tokens"] for x in ro); cht = sum(x["reencode_changed_tokens"] for x in ro)
    p = sum(x["prompts"] for x in ro); ps = sum(x["prompts_same_ids_as_gmt"] for x in ro)
    summary["reencode"] = {"completions": c, "changed": ch, "changed_fraction": ch / c if c else None,
                           "completion_tokens": tok, "changed_tokens": cht}
    print(f"re-encoding the sampled ids: {ch}/{c} completions change ({cht} of {tok} tokens); "
          f"prompt ids identical to gmt-mlx's: {ps}/{p}")
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
print(f"summary: {out / 'summary.json'}")
PY

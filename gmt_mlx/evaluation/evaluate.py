"""Evaluation: loss and perplexity on a split, and generation-based accuracy.

Library first: `split_loss` (token-weighted loss over a tokenized split),
`generate_batch` (batched greedy generation), `generation_accuracy` (answers
scored by pluggable scorers, see `scorers.py`), `evaluate_model` (both, on
an already loaded model) and `evaluate` (load a model or run directory and a
data split, then both). How to evaluate is one `EvalOptions` value, which
`gmt-mlx eval` builds from its options and hands to `evaluate`.
`reward_eval.reward_evaluation` scores greedy answers with GRPO's rewards
(`--reward`): the same measure as a GRPO run's validation reward. What a row
asks, and its token ids, are `prompts.py`'s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import mlx.nn as nn
import numpy as np

from gmt_mlx.config import EVAL_MAX_TOKENS, Config, eval_default
from gmt_mlx.core.losses import PREFERENCE_METRICS, SFT_EVAL_METRICS, sft_eval_loss, sft_loss
from gmt_mlx.core.trainer import evaluate_loss, loss_sums, mean_metrics
from gmt_mlx.data import sources
from gmt_mlx.data.batching import PAD_MULTIPLE, batch_order, make_batch
from gmt_mlx.data.batching import pad_id as batch_pad_id
from gmt_mlx.data.encoding import TokenizedSplit, tokenize_split
from gmt_mlx.data.formats import is_preference_row
from gmt_mlx.data.prompts import describe_prompt, prompt_of, prompt_tokens, split_where
from gmt_mlx.data.scorers import get_scorer, reference_of
from gmt_mlx.data.sources import load_splits
from gmt_mlx.errors import UserError
from gmt_mlx.objectives import objective_of
from gmt_mlx.objectives.dpo.reference import reference_logps
from gmt_mlx.objectives.grpo.reward_eval import check_reward_rows, has_completions, limited, reward_evaluation
from gmt_mlx.objectives.grpo.rewards import RewardSet, parse_rewards
from gmt_mlx.run import rundir

# Written once, in config (EvalFields, and Config's --max-seq-length for a plain model).
DEFAULT_MAX_TOKENS = EVAL_MAX_TOKENS
DEFAULT_BATCH_SIZE = eval_default("batch_size")
DEFAULT_MAX_SEQ_LENGTH = Config.__dataclass_fields__["max_seq_length"].default


@dataclass(frozen=True)
class EvalOptions:
    """How to evaluate: the split, what to measure and with which settings (`gmt-mlx eval`'s options).

    ``scorers``, ``rewards``, ``max_tokens``, ``mask_prompt``, ``assistant_turns``,
    ``max_seq_length`` and the data options (``columns``, ``data_config``,
    ``data_splits``: how to read the data) left None mean "the run's own, else
    the default": `for_run` fills them in. A GRPO run's own are its rewards
    (``--reward``, ``--reward-weights``) and its --max-completion-length, with no
    scorer; anything else's are the "exact" scorer and DEFAULT_MAX_TOKENS.
    ``limit`` caps the prompts generated for, never the loss.
    """

    split: str = eval_default("split")
    scorers: Optional[Tuple[str, ...]] = None
    mask_prompt: Optional[bool] = None
    assistant_turns: Optional[str] = None
    max_seq_length: Optional[int] = None
    batch_size: int = DEFAULT_BATCH_SIZE
    max_tokens: Optional[int] = None
    limit: Optional[int] = None
    loss: bool = True
    generate: bool = True
    columns: Optional[str] = None
    data_config: Optional[str] = None
    data_splits: Optional[str] = None
    rewards: Optional[str] = None  # --reward's names ("number,format"), scored on greedy answers
    reward_weights: Optional[str] = None

    def __post_init__(self) -> None:
        # A list of scorer names (parse_scorers, a CompareSpec) is accepted; a tuple keeps the value frozen.
        if self.scorers is not None:
            object.__setattr__(self, "scorers", tuple(self.scorers))

    def data_options(self) -> Dict[str, Optional[str]]:
        """{columns, data_config, data_splits}: `load_splits`' keywords."""
        return {key: getattr(self, key) for key in sources.DATA_KEYS}

    def for_run(self, run: Mapping[str, Any], data: Optional[str] = None) -> EvalOptions:
        """These options with what is unset taken from a run's config ``run`` ({} for a plain model), else defaults.

        The run's own data options apply only to the run's own data (``data``
        None or the run's ``data``); given ones always win.
        """
        own = sources.data_options(dict(run)) if not data or data == run.get("data") else {}
        given = {key: value for key, value in self.data_options().items() if value is not None}
        grpo = objective_of(run).measure == "reward"
        # A GRPO run asked for nothing in particular is scored by its own rewards.
        own_rewards = grpo and self.rewards is None and not self.scorers
        rewards = run.get("reward", "exact") if own_rewards else self.rewards
        weights = run.get("reward_weights") if own_rewards else self.reward_weights
        scorers = self.scorers if self.scorers is not None else (() if rewards else ("exact",))
        max_tokens = self.max_tokens or (run.get("max_completion_length") if grpo else None) or DEFAULT_MAX_TOKENS
        return replace(
            self,
            scorers=scorers,
            rewards=rewards,
            reward_weights=weights,
            max_tokens=max_tokens,
            mask_prompt=run.get("mask_prompt", True) if self.mask_prompt is None else self.mask_prompt,
            assistant_turns=self.assistant_turns or run.get("assistant_turns") or "final",
            max_seq_length=self.max_seq_length or run.get("max_seq_length", DEFAULT_MAX_SEQ_LENGTH),
            **{**own, **given},
        )

    def reward_set(self) -> Optional[RewardSet]:
        """The rewards to score with (`rewards.parse_rewards`: one-line errors), None without any."""
        return parse_rewards(self.rewards, self.reward_weights) if self.rewards else None


def split_loss(
    model: nn.Module,
    split: TokenizedSplit,
    *,
    batch_size: int,
    pad_id: int,
    max_batches: int = -1,
    pad_multiple: int = PAD_MULTIPLE,
    group=None,
    loss_fn: Callable = sft_loss,
) -> dict:
    """Token-weighted loss and perplexity over (the first ``max_batches`` batches of) a split.

    Uses every example (the last batch may be smaller), in a fixed
    length-grouped order so the value is comparable across steps and runs.
    With a distributed ``group``, rank r evaluates batches r, r + N, ... and
    the sums are reduced over ranks. An SFT split also gets "exact_match": the
    share of its examples that greedy decoding would answer exactly (see
    `losses.sft_eval_loss`). A preference ``loss_fn`` gives the mean per pair
    and its metrics (see `trainer.evaluate_loss`).
    """
    if loss_fn is sft_loss:
        loss_fn = sft_eval_loss  # the same loss, and the exact-match count from the same logits
    order = batch_order(split.lengths(), min(batch_size, len(split)), seed=0, epoch=0)
    covered = {i for batch in order for i in batch}
    leftover = [i for i in range(len(split)) if i not in covered]
    if leftover:
        order.append(leftover)
    if max_batches > 0:
        order = order[:max_batches]
    if group is None or group.size() == 1:
        batches = (make_batch(split, idx, pad_id=pad_id, pad_multiple=pad_multiple) for idx in order)
        return evaluate_loss(model, batches, loss_fn)
    import mlx.core as mx

    mine = order[group.rank() :: group.size()]
    batches = (make_batch(split, idx, pad_id=pad_id, pad_multiple=pad_multiple) for idx in mine)
    total, count, sums = loss_sums(model, batches, loss_fn)
    # The same keys on every rank, whether or not it had a batch.
    if split.preference:
        keys = list(PREFERENCE_METRICS)
    else:
        keys = list(SFT_EVAL_METRICS) if loss_fn is sft_eval_loss else []
    reduced = mx.distributed.all_sum(mx.array([total, count] + [sums.get(k, 0.0) for k in keys]), group=group).tolist()
    return mean_metrics(reduced[0], reduced[1], dict(zip(keys, reduced[2:])))


def generate_text(model: nn.Module, tokenizer, prompt, *, max_tokens: int = 64, chat: Optional[bool] = None) -> str:
    """Greedy continuation of ``prompt`` (a string or a list of chat messages).

    A string is wrapped as a user turn when the tokenizer has a chat template
    (unless ``chat=False``).
    """
    from mlx_lm.generate import generate

    model.eval()
    return generate(model, tokenizer, prompt_tokens(tokenizer, prompt, chat=chat), max_tokens=max_tokens, verbose=False)


def generate_batch(
    model: nn.Module,
    tokenizer,
    prompts: Sequence,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    chat: Optional[bool] = None,
    on_batch: Optional[Callable[[int, int], None]] = None,
) -> List[str]:
    """Greedy answers to ``prompts`` (strings or chat message lists), ``batch_size`` at a time.

    Prompts are grouped by length (less left-padding) and the answers come
    back in the prompts' order; generation stops at an end-of-sequence token
    or after ``max_tokens``. ``on_batch(done, total)`` reports progress.
    """
    from mlx_lm.generate import batch_generate

    if max_tokens < 1 or batch_size < 1:
        raise UserError(f"max_tokens and batch_size must be at least 1, got {max_tokens} and {batch_size}")
    ids = [prompt_tokens(tokenizer, p, chat=chat) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    answers: List[str] = [""] * len(ids)
    model.eval()
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        result = batch_generate(
            model,
            tokenizer,
            [ids[i] for i in chunk],
            max_tokens=max_tokens,
            prefill_batch_size=len(chunk),
            completion_batch_size=len(chunk),
        )
        for i, text in zip(chunk, result.texts):
            answers[i] = text
        if on_batch is not None:
            on_batch(min(start + batch_size, len(order)), len(order))
    return answers


def scored_rows(rows: List[dict], limit: Optional[int] = None) -> List[dict]:
    """The rows that have both a prompt and a reference answer, first ``limit`` of them."""
    usable = [r for r in rows if prompt_of(r) is not None and reference_of(r) is not None]
    return usable[:limit] if limit is not None and limit >= 0 else usable


def generation_accuracy(
    model: nn.Module,
    tokenizer,
    rows: List[dict],
    *,
    scorers: Sequence[str] = ("exact",),
    max_tokens: int = DEFAULT_MAX_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    limit: Optional[int] = None,
    on_batch: Optional[Callable[[int, int], None]] = None,
) -> dict:
    """Generate an answer to each row's prompt and score it with every scorer.

    Returns {"accuracy": {scorer: mean score}, "count": items scored,
    "items": [{"prompt", "reference", "answer", "scores"}]}. Rows without a
    prompt/answer pair (plain text) are skipped.
    """
    functions = {name: get_scorer(name) for name in scorers}
    chosen = scored_rows(rows, limit)
    answers = generate_batch(
        model,
        tokenizer,
        [prompt_of(r) for r in chosen],
        max_tokens=max_tokens,
        batch_size=batch_size,
        on_batch=on_batch,
    )
    items = []
    for row, answer in zip(chosen, answers):
        scores = {name: fn(answer, row) for name, fn in functions.items()}
        items.append(
            {
                "prompt": describe_prompt(prompt_of(row)),
                "reference": reference_of(row),
                "answer": answer,
                "scores": scores,
            }
        )
    accuracy = {name: (sum(i["scores"][name] for i in items) / len(items) if items else None) for name in functions}
    return {"accuracy": accuracy, "count": len(items), "items": items}


def evaluate_model(
    model: nn.Module,
    tokenizer,
    rows: List[dict],
    options: Optional[EvalOptions] = None,
    *,
    on_batch: Optional[Callable[[int, int], None]] = None,
    where: Optional[str] = None,
) -> dict:
    """Loss/perplexity over all of ``rows``, and generation accuracy and rewards (`reward_evaluation`)
    on (the first ``options.limit`` of) them.

    The loss covers what training covered: ``mask_prompt`` and ``assistant_turns`` as in `encode_example`
    (unset, they are True and "final", as for a plain model); prompt rows with no completion have none
    ("loss_skipped" says so). ``on_batch(done, total)`` reports generation; ``where`` names the rows' file.
    """
    options = (options or EvalOptions()).for_run({})
    rewards = options.reward_set()
    result: Dict[str, object] = {"split": options.split, "examples": len(rows)}
    t0 = time.perf_counter()
    if options.loss and not has_completions(rows):
        result["loss_skipped"] = "the rows are prompts with no completion"
    elif options.loss and are_pairs(rows):
        result.update(
            preference_accuracy(
                model,
                tokenizer,
                rows,
                split=options.split,
                max_seq_length=options.max_seq_length,
                batch_size=options.batch_size,
            )
        )
    elif options.loss:
        result.update(sft_loss_of(model, tokenizer, rows, options))
    if options.generate and rewards is not None:
        result.update(
            reward_evaluation(
                model,
                tokenizer,
                limited(rows, options.limit),
                rewards,
                max_tokens=options.max_tokens,
                batch_size=options.batch_size,
                where=where,
                on_batch=on_batch,
            )
        )
        result["reward_names"], result["reward_weights"] = rewards.names, rewards.weights
    if options.generate and options.scorers:
        result.update(
            generation_accuracy(
                model,
                tokenizer,
                rows,
                scorers=options.scorers,
                max_tokens=options.max_tokens,
                batch_size=options.batch_size,
                limit=options.limit,
                on_batch=on_batch,
            )
        )
    if options.generate:
        result["scorers"] = list(options.scorers)
        result["max_tokens"] = options.max_tokens
    result["wall_time"] = time.perf_counter() - t0
    return result


def sft_loss_of(model: nn.Module, tokenizer, rows: List[dict], options: EvalOptions) -> dict:
    """Loss, perplexity and target tokens of SFT rows, over what ``options`` (resolved: see `for_run`) train on."""
    tokenized = tokenize_split(
        rows,
        tokenizer,
        mask_prompt=options.mask_prompt,
        max_seq_length=options.max_seq_length,
        name=options.split,
        assistant_turns=options.assistant_turns if options.mask_prompt else "final",
    )
    if len(tokenized) == 0:
        raise UserError(f"{options.split} split has no examples with target tokens")
    measured = split_loss(model, tokenized, batch_size=options.batch_size, pad_id=batch_pad_id(tokenizer))
    return {
        "loss": measured["loss"],
        "ppl": measured["ppl"],
        "tokens": measured["tokens"],
        "mask_prompt": options.mask_prompt,
    }


def are_pairs(rows: List[dict]) -> bool:
    """Whether a split holds prompt/chosen/rejected rows (files hold one format: the first row decides)."""
    return bool(rows) and is_preference_row(rows[0])


def preference_accuracy(
    model: nn.Module, tokenizer, rows: List[dict], *, split: str, max_seq_length: int, batch_size: int
) -> dict:
    """How often the model gives the chosen answer a higher log-probability than the rejected one.

    Log-probabilities are summed over each answer's tokens. Returns
    preference_accuracy, margin (mean chosen - rejected log-probability),
    pairs, and every pair's (chosen, rejected) log-probabilities in
    ``pair_logps`` (with a base model's, the DPO rewards: see `evaluate_with_base`).
    """
    tokenized = tokenize_split(
        rows, tokenizer, mask_prompt=True, max_seq_length=max_seq_length, name=split, preference=True
    )
    if len(tokenized) == 0:
        raise UserError(f"{split} split has no pairs with room for an answer within {max_seq_length} tokens")
    logps = reference_logps(model, tokenized, batch_size=batch_size, pad_id=batch_pad_id(tokenizer)).astype(float)
    return {
        "preference_accuracy": float((logps[:, 0] > logps[:, 1]).mean()),
        "margin": float((logps[:, 0] - logps[:, 1]).mean()),
        "pairs": len(tokenized),
        "pair_logps": logps.tolist(),
    }


def against_base(tuned: dict, base: dict, run: Optional[dict] = None) -> dict:
    """DPO's numbers for a tuned model with its base as the reference, from two `preference_accuracy` results.

    reward_accuracy always; with the run's config ``run`` (a DPO run with the
    sigmoid or hinge loss, whose rewards use summed log-probabilities) also
    dpo_loss, the run's own loss on this split. Empty when the two did not
    score the same pairs.
    """
    if "pair_logps" not in tuned or "pair_logps" not in base or len(tuned["pair_logps"]) != len(base["pair_logps"]):
        return {}
    t, b = (np.asarray(r["pair_logps"], dtype=np.float64) for r in (tuned, base))
    out = {"reward_accuracy": float(((t[:, 0] - b[:, 0]) > (t[:, 1] - b[:, 1])).mean())}
    if run:  # the objective's own numbers against this reference (DPO: its loss)
        out.update(objective_of(run).against_reference(run, t, b))
    return out


def saved_run_config(model_or_run: str) -> Optional[dict]:
    """The config of a gmt-mlx run directory (`rundir.read_config`), or None for a plain model.

    A damaged config.yaml is a UserError saying which file and why, in one line.
    """
    if not (Path(model_or_run) / rundir.CONFIG_FILE).is_file():
        return None
    return rundir.read_config(model_or_run)


def evaluate(
    model_or_run: str,
    data: Optional[str] = None,
    options: Optional[EvalOptions] = None,
    *,
    on_batch: Optional[Callable[[int, int], None]] = None,
) -> dict:
    """Evaluate a model (run directory, HF folder, GGUF, Hub id or 'smollm2-135m') on a data split.

    For a run directory, ``data`` and what ``options`` leave unset (the data
    options, mask_prompt, assistant_turns, max_seq_length) default to the run's
    own config, so the loss compares with its validation loss. Otherwise the
    loss is on completions only (mask_prompt True) by default.
    """
    from gmt_mlx.models.loading import load_base, run_model_dir

    options = options or EvalOptions()
    for name in options.scorers or ():
        get_scorer(name)  # unknown scorer or missing package: fail before loading anything
    run = saved_run_config(model_or_run) or {}
    options = options.for_run(run, data)
    options.reward_set()  # an unknown reward or bad weights: one line, before anything is loaded
    data = data or run.get("data")
    rows = load_rows(data, options)
    if not options.loss and not options.generate:
        raise UserError("nothing to do: both the loss and the generation accuracy are switched off")
    if options.rewards and options.generate:  # rows the rewards cannot score: before the model load
        check_reward_rows(limited(rows, options.limit), options.reward_set(), split_where(str(data), options.split))
    model, tokenizer, _, path = load_base(run_model_dir(model_or_run), dequantize=False)
    result = evaluate_model(
        model, tokenizer, rows, options, on_batch=on_batch, where=split_where(str(data), options.split)
    )
    return {"model": str(model_or_run), "model_path": str(path), "data": str(data), **result}


def load_rows(data: Optional[str], options: EvalOptions) -> List[dict]:
    """The rows of ``options.split`` of ``data``, read with the options' data options."""
    if not data:
        raise UserError(
            "--data is required (a folder with train/valid/test.jsonl, a data file, a saved dataset "
            "or a Hub dataset id)"
        )
    splits = load_splits(data, **options.data_options(), prompts=bool(options.rewards))
    if options.split not in splits:
        raise UserError(f"{data}: no {options.split} split (found: {', '.join(splits)})")
    return splits[options.split]


def base_model_of(run_dir: str) -> str:
    """The base model a run was fine-tuned from (its config's ``model``)."""
    run = saved_run_config(run_dir)
    if not run or not run.get("model"):
        raise UserError(
            f"{run_dir}: comparing with the base model needs a gmt-mlx run directory "
            "(its config.yaml names the base model)"
        )
    return str(run["model"])


def evaluate_with_base(
    run_dir: str,
    data: Optional[str] = None,
    options: Optional[EvalOptions] = None,
    *,
    on_model: Optional[Callable[[str], None]] = None,
    on_batch: Optional[Callable[[int, int], None]] = None,
) -> dict:
    """`evaluate` a run and the base model it was fine-tuned from, on the same split and rows.

    Both use the run's data (unless ``data``), data options, prompt masking
    and sequence length, so their losses and accuracies compare item by item.
    Returns {"base": result, "tuned": result} with `evaluate`'s results;
    ``on_model(role)`` is called before each ("base", then "tuned").
    """
    base = base_model_of(run_dir)
    run = saved_run_config(run_dir) or {}
    # The base model is no run: settle every run-dependent option here, so both read the data alike.
    options = (options or EvalOptions()).for_run(run, data)
    data = data or run.get("data")
    results = {}
    for role, model in (("base", base), ("tuned", run_dir)):
        if on_model is not None:
            on_model(role)
        results[role] = evaluate(model, data, options, on_batch=on_batch)
    results["tuned"].update(against_base(results["tuned"], results["base"], run))
    return results


def score_summary(result: dict, scorer: str) -> str:
    """A scorer's accuracy as "27/32 (84%)" (a mean percentage when there is partial credit)."""
    count = result.get("count", 0)
    value = result.get("accuracy", {}).get(scorer)
    if not count or value is None:
        return "n/a"
    scores = [item["scores"][scorer] for item in result.get("items", [])]
    if all(float(s) in (0.0, 1.0) for s in scores):
        return f"{int(sum(float(s) for s in scores))}/{count} ({100 * value:.0f}%)"
    return f"{100 * value:.1f}% of {count}"

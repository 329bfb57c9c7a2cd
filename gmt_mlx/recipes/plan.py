"""Planning a run: what to do with the run directory, and what the run will draw from its data.

`plan_run` decides between a fresh start, a resume and nothing (a finished
run) and refuses to clobber what the user made; the rest turns the config and
the training split into the numbers the loop runs on: tokenized splits, the
step count, the examples per step and the padded batches.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import mlx.core as mx
import numpy as np

from gmt_mlx import config as cfg
from gmt_mlx.config import Config
from gmt_mlx.data.batching import PAD_MULTIPLE, check_split_size, iterate_batches, length_buckets
from gmt_mlx.data.encoding import TokenizedSplit
from gmt_mlx.errors import UserError
from gmt_mlx.objectives import objective_of
from gmt_mlx.platform.blas import arithmetic, select_hint
from gmt_mlx.run import final, rundir


@dataclass
class RunPlan:
    """What to do with the output folder: start fresh (maybe replacing a run), resume, or nothing (finished)."""

    out: Path
    fresh: bool
    replace: bool = False
    checkpoint: Optional[Path] = None
    meta: Optional[dict] = None  # the checkpoint's verified state.json
    finished: bool = False


def plan_run(
    config: Config,
    *,
    overwrite: bool = False,
    resume: bool = False,
    force: bool = False,
    ranks: int = 1,
    log: Callable[[str], None] = print,
) -> RunPlan:
    """Decide between a fresh run and a resume; refuse to clobber anything the user made.

    An interrupted run of the same config in ``--out`` is resumed
    automatically from its newest checkpoint that verifies; one with a
    different config is refused with the differing keys (``--force`` resumes
    anyway, ``--overwrite`` starts over). A run that never got past set-up is
    simply started again. A folder that is not a gmt-mlx run is never touched.
    ``ranks``: the data-parallel processes of this (and so of the interrupted) run.
    """
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if not out.is_dir() or rundir.is_empty(out):
        if resume:  # killed before set-up finished: nothing to lose, so continuing it is starting it
            log(f"nothing to resume in {out} yet (it stopped before training started): starting it")
        return RunPlan(out, fresh=True)
    if not rundir.is_run_dir(out):
        raise UserError(f"--out {out} is a non-empty folder that is not a gmt-mlx run; choose another")
    if overwrite:
        return RunPlan(out, fresh=True, replace=True)
    if rundir.is_finished(out):
        if resume:
            refuse_new_options(out, config)
        return _plan_finished(out, resume, log)
    if rundir.has_model(out):  # killed after model/ was written, before the run's last file
        log(f"{out}: model/ is written but not everything the run promised (samples, card, push): completing it")
    if not rundir.has_trained(out):
        # Set-up failed or was killed (e.g. --batch-size above the train split's size): its
        # files took nothing but set-up to make, so the corrected command just replaces them.
        if resume:
            log(f"nothing to resume in {out} yet (it stopped before training started): starting it")
        return RunPlan(out, fresh=True, replace=True)
    latest, meta, skipped = rundir.newest_verified(out)
    if latest is None and skipped:
        raise UserError(
            f"cannot resume {out}: no checkpoint verifies ({'; '.join(skipped)}); pass --overwrite to start over"
        )
    if skipped:
        log(f"warning: {'; '.join(skipped)}; resuming from {latest.name}, the newest checkpoint that verifies")
    try:
        previous = rundir.run_config(out, log)
    except UserError as err:
        raise UserError(f"cannot resume {out}: {err}; pass --overwrite to start over") from None
    differences = cfg.diff({**Config().to_dict(), **previous}, config.to_dict())
    if differences and not force:
        listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in differences.items()))
        raise UserError(
            f"{out} holds a run with a different config ({listed}); pass --force to resume it "
            f"anyway or --overwrite to start over"
        )
    if latest is not None:
        check_loss_normalisation(out, meta, ranks)
        check_arithmetic(out, meta, force=force, log=log)
    else:
        log(f"no checkpoint in {out} yet (it stopped before its first save): starting it over")
    # No checkpoint yet (killed early): start over in place. A checkpoint at the
    # last step (killed while saving the model) resumes straight to the save.
    return RunPlan(out, fresh=latest is None, replace=latest is None, checkpoint=latest, meta=meta)


def refuse_new_options(out: Path, config: Config) -> None:
    """`--resume` of a finished run with options it did not run with (`--iters 16` after 8): refused, with the
    command that trains further. Continuing it would not give the run those options would have made: the
    learning-rate schedule (cosine, warmup) is set by the total steps, so steps 9-16 of a 16-step run are
    not 8 more steps after an 8-step one; a silent "nothing changed" would hide that the flags were ignored."""
    try:
        previous = rundir.run_config(out)
    except UserError:
        return  # no readable config: _plan_finished and the checks after it say what is wrong
    differences = cfg.diff({**Config().to_dict(), **previous}, config.to_dict(), ignore=("out",))
    if not differences:
        return
    listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in differences.items())
    if set(differences) == {"push_to_hub"}:
        raise UserError(f"{out} is a finished run; to upload its model: gmt-mlx push {out} --repo {config.push_to_hub}")
    done = rundir.last_step(out) or previous.get("iters")
    flags = []
    for key, (_, value) in differences.items():
        if key == "iters" and isinstance(done, int) and value > done:
            value = value - done  # the steps still wanted, from the finished model
        if isinstance(value, bool):
            flags.append(f"--{cfg.flag(key)}" if value else f"--no-{cfg.flag(key)}")
        elif value is not None:
            flags.append(f"--{cfg.flag(key)} {shlex.quote(str(value))}")
    # The run's own config.yaml as the base (data, --columns, method ...), its model as the start.
    command = (
        f"gmt-mlx finetune -c {shlex.quote(str(out / rundir.CONFIG_FILE))} "
        f"--model {shlex.quote(str(rundir.model_dir(out)))} {' '.join(flags)} "
        f"--out {shlex.quote(f'{out}-more')}"
    )
    raise UserError(
        f"{out} is a finished run ({done} steps); --resume does not continue it with other options "
        f"({listed}): its learning-rate schedule was set by its {done} steps, so more steps would not "
        f"equal a run started with them. Train on from its model (a new schedule and optimizer): "
        f"{command}, or start over with --overwrite"
    )


def _plan_finished(out: Path, resume: bool, log: Callable[[str], None]) -> RunPlan:
    """A finished run: nothing to do if its model verifies; a damaged model/ is rebuilt from the final step's
    checkpoint, like an interrupted run is resumed (with or without --resume)."""
    damage = final.model_damage(out)
    if damage is None and resume:
        return RunPlan(out, fresh=False, finished=True)
    if damage is None:
        raise UserError(
            f"--out {out} already holds a finished run; pass --overwrite to replace it or choose another --out"
        )
    latest, meta = final.final_checkpoint(out)
    if latest is None:
        raise UserError(
            f"{out}: {damage}, and no checkpoint holds the final step to rebuild it from; export a "
            f"checkpoint (gmt-mlx export {out} --checkpoint best) or start over with --overwrite"
        )
    log(f"warning: {out}: {damage}; rebuilding model/ from {latest.name}, the final step's checkpoint")
    return RunPlan(out, fresh=False, checkpoint=latest, meta=meta)


def check_loss_normalisation(out: Path, state: dict, ranks: int) -> None:
    """Refuse a checkpoint (its state.json ``state``) whose steps averaged micro-batch means (gmt-mlx < 0.2)
    where that differs.

    With one micro-batch per step on one process both rules give the same
    gradient, so such a checkpoint resumes; otherwise the run's gradient would
    change definition mid-run.
    """
    if "loss_normalisation" in state:
        return
    accumulation = int((state.get("config") or {}).get("grad_accumulation_steps", 1))
    if accumulation > 1 or ranks > 1:
        raise UserError(
            f"{out} was started by gmt-mlx before 0.2's change to gradient accumulation (micro-batches "
            "are now weighted by their target tokens); resuming it would change its training mid-run: "
            "start it over with --overwrite"
        )


def check_arithmetic(out: Path, state: dict, *, force: bool, log: Callable[[str], None]) -> None:
    """Refuse (or, with --force, warn about) a resume under another device or BLAS than the checkpoint's.

    Another BLAS sums in another order, so the resumed run would not end where
    the interrupted one would have; the message says how to get the old one back.
    """
    saved, now = state.get("arithmetic"), arithmetic()
    if not isinstance(saved, dict) or saved == now:  # checkpoints before gmt-mlx recorded it: nothing to compare
        return
    changed = "; ".join(
        f"{key} {saved.get(key)} -> {now.get(key)}"
        for key in sorted(set(saved) | set(now))
        if saved.get(key) != now.get(key)
    )
    if force:
        log(
            f"warning: {out}'s checkpoints were computed under another arithmetic ({changed}); continuing (--force): "
            "the result will differ from an uninterrupted run's"
        )
        return
    old = select_hint(saved["blas"]) if saved.get("blas") != now.get("blas") else "the device it ran on"
    raise UserError(
        f"cannot resume {out} bit for bit: its checkpoints were computed under another arithmetic "
        f"({changed}); resume under the old one ({old}) or pass --force to continue under this one"
    )


def total_steps(config: Config, n_train: int) -> int:
    """Optimizer steps for the run: --iters, or --epochs over the training split."""
    if config.epochs is None:
        return config.iters
    # GRPO trains --num-iterations steps on each step's worth of prompts (a round of rollouts).
    reuse = objective_of(config).rounds(config)
    return max(1, math.ceil(config.epochs * max(1, n_train // step_examples(config)) * reuse))


def step_examples(config: Config) -> int:
    """Examples per optimizer step: --batch-size micro-batches x --grad-accumulation-steps."""
    return config.batch_size * config.grad_accumulation_steps


def check_step_fits(n: int, config: Config, name: str = "train") -> None:
    """Refuse a split with fewer examples than one optimizer step draws, naming the flags."""
    if config.grad_accumulation_steps == 1:
        check_split_size(n, config.batch_size, name)
    elif n < step_examples(config):
        raise UserError(
            f"{name} split has {n} examples, fewer than one optimizer step takes (--batch-size "
            f"{config.batch_size} x --grad-accumulation-steps {config.grad_accumulation_steps}); "
            f"lower them or add examples"
        )


def _batch_tokens(mask: mx.array) -> int:
    """Real (unpadded) tokens in a batch: targets run to each example's end."""
    m = np.array(mask)
    last = m.shape[1] - np.argmax(m[:, ::-1] > 0, axis=1)
    return int(last.sum())


def train_buckets(split: TokenizedSplit, config: Config) -> List[int]:
    """The padded widths of this run's training batches (data.length_buckets).

    Against rounding each batch up to a multiple of 8 they cut the padding of
    the shipped examples from 8-19% to 1-3% of the positions, and they bound
    the compiled step shapes at 16 whatever the spread of lengths
    (benchmarks/RESULTS.md). Deterministic in (lengths, batch size, seed), so
    a resumed run pads exactly as the first start did.
    """
    return length_buckets(split.lengths(), config.batch_size, seed=config.seed)


def train_batches(
    split: TokenizedSplit,
    config: Config,
    pad_id: int,
    start_micro: int,
    *,
    shard: tuple = (0, 1),
    buckets: Optional[List[int]] = None,
    count: Callable[[int], None] = lambda tokens: None,
) -> Iterator:
    """This rank's micro-batches from micro-batch ``start_micro`` on; ``count`` hears each one's real tokens.

    Each step draws one batch of batch_size x grad_accumulation_steps examples and
    splits it into micro-batches, so `--batch-size 8` and `--batch-size 4
    --grad-accumulation-steps 2` train on the same examples per step.
    """
    accumulation = config.grad_accumulation_steps
    for _, _, *batch in iterate_batches(
        split,
        step_examples(config),
        seed=config.seed,
        pad_id=pad_id,
        pad_multiple=PAD_MULTIPLE,
        start_step=start_micro // accumulation,
        shard=shard,
        buckets=buckets,
        micro_batches=accumulation,
    ):
        count(_batch_tokens(batch[1]))
        yield tuple(batch)

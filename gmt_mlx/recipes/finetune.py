"""The fine-tuning recipe: plan the run dir -> set up -> train -> save.

`finetune(config)` is what `gmt-mlx finetune` runs. Each phase is a small
function; the loop itself is `trainer.train`. A run that is killed at any
moment and resumed ends with exactly the weights it would have had: every
checkpoint holds weights, optimizer state, step and RNG, the data order is a
pure function of (seed, epoch), and masks derive from (seed, step).
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Any, Callable, Optional, Tuple

from gmt_mlx.config import Config
from gmt_mlx.core.distributed import check_batch_size, check_same_config, init_group, is_main
from gmt_mlx.core.trainer import NonFiniteError, train
from gmt_mlx.errors import Interrupted, UserError
from gmt_mlx.hub import check_push
from gmt_mlx.objectives import objective_of
from gmt_mlx.recipes.outputs import RunLogger, RunResult, finished_result, samples_before, save_final
from gmt_mlx.recipes.plan import RunPlan, plan_run, train_batches
from gmt_mlx.recipes.setup import Setup, build_setup, print_summary
from gmt_mlx.run import checkpoint as ckpt
from gmt_mlx.run import rundir, tracking
from gmt_mlx.run.lock import RunLock


def finetune(
    config: Config,
    *,
    overwrite: bool = False,
    resume: bool = False,
    force: bool = False,
    log: Callable[[str], None] = print,
    on_validation: Optional[Callable[[int, Any, dict], None]] = None,
) -> RunResult:
    """Fine-tune ``config.model`` on ``config.data`` and write (or resume) the run directory.

    ``on_validation(step, model, result)`` is called (rank 0) after each
    validation pass with the model being trained and the validation numbers
    (loss, ppl, exact_match or the preference metrics, and "best": whether it
    is the best so far); a study can measure more there (see
    studies/ceiling_study.py). It must not change the model.

    Under `mlx.launch` every rank runs this; rank 0 alone prints, writes
    metrics, checkpoints and the final model (see distributed.py), and holds
    the run directory's lock while it does (run/lock.py: one writer per run).
    """
    lock = RunLock()
    try:
        return _finetune(
            config, lock, overwrite=overwrite, resume=resume, force=force, log=log, on_validation=on_validation
        )
    finally:
        lock.release()


def _finetune(
    config: Config,
    lock: RunLock,
    *,
    overwrite: bool,
    resume: bool,
    force: bool,
    log: Callable[[str], None],
    on_validation: Optional[Callable[[int, Any, dict], None]],
) -> RunResult:
    """`finetune` with ``lock`` taken (rank 0) before the run directory is read, and kept until the end."""
    config.validate()
    tracking.check(config.report_to)  # a missing extra is said before anything loads or is written
    group = init_group(config.distributed_backend)
    main = is_main(group)
    if not main:
        log = lambda *_: None  # noqa: E731
    check_batch_size(config.batch_size, group.size())
    if main:  # before the folder is read: a second writer is refused here, before it plans anything
        lock.hold(config.out)
    plan = plan_run(config, overwrite=overwrite, resume=resume, force=force, ranks=group.size(), log=log)  # fail fast
    if plan.finished:  # --resume of a finished run: report it, change nothing
        return finished_result(plan.out)
    # Also a barrier: no rank reads the run dir after rank 0 starts changing it.
    check_same_config(config.to_dict(), group)
    if config.push_to_hub:
        check_push(config.push_to_hub)  # repo id and token, before hours of training

    run = build_setup(config, log)
    # The objective's part of the run: DPO checks its saved reference before anything is written; GRPO
    # takes its sampling key (and a round in use) back from the checkpoint; DPO computes its reference.
    run.session.check_saved(plan.out, plan.checkpoint)
    if main:  # a folder that did not exist when planned: made and locked before the first write
        lock.hold(plan.out, new=True)
    start_step, best_val = _open_run_dir(plan, config, run, main, log)
    run.session.restore(start_step, plan.meta, plan.checkpoint)
    print_summary(config, run, log)
    run.session.prepare(plan.out, plan.checkpoint, write=main, log=log)
    if group.size() > 1:
        log(
            f"ranks      {group.size()} data-parallel ranks, {config.batch_size // group.size()} examples each per "
            f"micro-batch"
        )
    prompts, before = (
        samples_before(config, run, plan.out, fresh=plan.checkpoint is None, log=log) if main else ([], [])
    )

    logger = RunLogger(
        config, run, plan.out, group, best_val=best_val, start_step=start_step, on_validation=on_validation
    )
    if objective_of(config).validates_at_start and plan.checkpoint is None:
        # Where training starts: DPO's ln 2 (policy = reference), GRPO's reward of the step-0 model.
        logger.on_eval(0, initial=True)
    _train_to_the_end(config, run, plan, logger, start_step, group, log)
    if not main:  # the other ranks hold the same weights; rank 0 writes them
        return logger.result(rundir.model_dir(plan.out), [], start_step)
    return save_final(config, run, plan.out, logger, prompts, before, start_step, log)


def _train_to_the_end(
    config: Config, run: Setup, plan: RunPlan, logger: RunLogger, start_step: int, group, log
) -> None:
    """Train, saving a checkpoint when stopped early; an interruption becomes `Interrupted` with the resume command."""
    try:
        last_step = _train(config, run, logger, start_step, group, log)
        if last_step < run.steps and is_main(group) and logger.saved_step != last_step:
            logger.save(last_step)
    except KeyboardInterrupt:
        # A second Ctrl-C (maybe mid-save: saves are atomic, the partial one is removed):
        # the newest complete checkpoint still resumes the run exactly.
        latest = rundir.latest_checkpoint(plan.out)
        where = f"the newest checkpoint is {latest.name}" if latest else "no checkpoint was saved yet"
        raise Interrupted(
            f"aborted without saving; {where}. Resume with: gmt-mlx finetune --resume {plan.out}"
        ) from None
    if last_step < run.steps:
        raise Interrupted(
            f"interrupted at step {last_step} of {run.steps}; checkpoint saved. "
            f"Resume with: gmt-mlx finetune --resume {plan.out}"
        )


@contextmanager
def stop_on_sigint(log: Callable[[str], None]):
    """First Ctrl-C asks the loop to stop after the current step; a second one aborts."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield stop.is_set
        return

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        log("\nstopping after this step to save a checkpoint (Ctrl-C again to abort without saving)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


def _open_run_dir(plan: RunPlan, config: Config, run: Setup, main: bool, log) -> Tuple[int, Optional[float]]:
    """Create (or replace) the run directory, or restore its checkpoint; return (start step, best val loss)."""
    out = plan.out
    if main:
        if plan.replace:
            rundir.clear(out)
        out.mkdir(parents=True, exist_ok=True)
        # Only now, with set-up done: a failed set-up leaves no config.yaml to block the corrected command.
        rundir.write_config(config, out)
    start_step, best_val = 0, None
    if plan.checkpoint is not None:
        meta = ckpt.load_checkpoint(plan.checkpoint, run.model, run.optimizer, verified=plan.meta)
        start_step, best_val = int(meta["step"]), meta.get("best_val_loss")
        best = rundir.best_dir(out)
        if best.is_dir():  # a step checkpoint saved just before a new best knows the older best
            try:
                best_val = ckpt.read_state(best).get("best_val_loss", best_val)
            except ckpt.DamagedCheckpoint as err:
                log(f"warning: {err}; the next best validation loss replaces it")
        if main:
            damaged = rundir.damaged_metrics(out)
            if damaged:
                log(f"warning: {damaged}")
            rundir.truncate_metrics(out, start_step)
        log(f"resuming   from {plan.checkpoint} (step {start_step} of {run.steps})")
    elif main:
        rundir.reset_metrics(out)
    return start_step, best_val


def _train(config: Config, run: Setup, logger: "RunLogger", start_step: int, group, log) -> int:
    """The loop from ``start_step``; return the last step done. Divergence and a lost rank become UserErrors."""
    # The split's batches in their resumable order, unless the objective makes its own (GRPO's rollouts).
    shard = (group.rank(), group.size())
    batches = run.session.batches(
        lambda: train_batches(
            run.train_split,
            config,
            run.pad_id,
            start_step * config.grad_accumulation_steps,
            shard=shard,
            buckets=run.buckets,
            count=logger.count_tokens,
        ),
        logger.count_tokens,
        shard,
    )
    on_step = run.session.on_step(logger.on_step)
    try:
        with stop_on_sigint(log) as should_stop:
            return train(
                run.model,
                run.optimizer,
                batches,
                iters=run.steps,
                start_step=start_step,
                grad_accumulation_steps=config.grad_accumulation_steps,
                grad_clip=config.grad_clip,
                loss_fn=run.loss_fn,
                steps_per_eval=config.steps_per_eval,
                should_stop=should_stop,
                max_bad_steps=config.max_bad_steps,
                group=group,
                on_step=on_step,
                on_eval=logger.on_eval,
                update_per_layer=config.update_per_layer,
            )
    except NonFiniteError as err:
        latest = rundir.latest_checkpoint(logger.out)
        where = f"the last good checkpoint is {latest}" if latest else "no checkpoint was saved yet"
        raise UserError(f"stopped: {err}; {where}. Lower --learning-rate or check the data") from None
    except RuntimeError as err:
        if group.size() == 1 or "[ring]" not in str(err) and "peer" not in str(err):
            raise
        latest = rundir.latest_checkpoint(logger.out)
        raise UserError(
            f"rank {group.rank()} lost contact with another rank ({str(err).splitlines()[0]}); "
            f"resume from {latest or 'the start'} with the same mlx.launch command"
        ) from None
    finally:
        logger.close()

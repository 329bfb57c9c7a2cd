"""DPO's reference: the step-0 model's log-probabilities, computed once and kept in the run directory.

DPO compares the tuned model's log-probability of each answer with the
reference model's. The reference is the model at step 0 (for LoRA/DoRA, whose
adapters start at zero, that is the base), so its log-probabilities of every
chosen and rejected answer are fixed numbers: we compute them in one batched
forward pass before the first step and store them (docs/design.md decision 10).
No second copy of the model stays in memory, which is what lets a machine
that holds one model run DPO on it; and a resumed run reads the same numbers
back, so it continues bit for bit. They are valid only for the exact tokens
they were computed on: each split's fingerprint is stored beside them, and a
changed dataset is refused (a trained model cannot recompute them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from gmt_mlx.core.losses import sequence_logps
from gmt_mlx.data.batching import PAD_MULTIPLE, make_batch
from gmt_mlx.data.encoding import TokenizedSplit
from gmt_mlx.errors import UserError
from gmt_mlx.run import rundir
from gmt_mlx.run.rundir import REFERENCE_FILE

FORMAT = 1


def reference_logps(
    model: nn.Module,
    split: TokenizedSplit,
    *,
    batch_size: int,
    pad_id: int,
    indices: Optional[Sequence[int]] = None,
    on_batch: Callable[[int, int], None] = lambda done, total: None,
) -> np.ndarray:
    """Each pair's summed answer log-probabilities under ``model`` (in eval mode): (n, 2) float32, (chosen, rejected).

    Only the pairs at ``indices`` (default: all) are computed; the others are NaN.
    """
    if not split.preference:
        raise ValueError(f"{split.name} split holds no preference pairs")
    plain = TokenizedSplit(split.examples, split.truncated, split.name, max_seq_length=split.max_seq_length)
    model.eval()
    # Batches of similar length pad little; the values do not depend on the order.
    wanted = range(len(plain)) if indices is None else indices
    order = sorted(wanted, key=lambda i: plain.examples[i].length)
    out = np.full((len(plain), 2), np.nan, dtype=np.float32)
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        tokens, mask = make_batch(plain, indices, pad_id=pad_id, pad_multiple=PAD_MULTIPLE)
        logps, _ = sequence_logps(model, tokens, mask)
        values = np.array(logps, dtype=np.float32)
        out[indices, 0], out[indices, 1] = values[: len(indices)], values[len(indices) :]
        on_batch(min(start + batch_size, len(order)), len(order))
    return out


def save_reference(run_dir: Path, splits: Dict[str, TokenizedSplit]) -> Path:
    """Write every split's reference (and fingerprint) to RUN_DIR/reference_logps.json, atomically."""
    # A pair the run never draws has no reference (NaN in memory, null in the file).
    record = {
        "format": FORMAT,
        "splits": {
            name: {
                "fingerprint": split.fingerprint(),
                "pairs": len(split),
                "logps": [[None if np.isnan(v) else float(v) for v in row] for row in split.reference],
            }
            for name, split in splits.items()
        },
    }
    return rundir.write_reference(run_dir, record)


def load_reference(
    run_dir: Path, splits: Dict[str, TokenizedSplit], needed: Optional[Dict[str, Sequence[int]]] = None
) -> None:
    """Set each split's ``reference`` from the run directory, refusing a missing, damaged or stale file,
    or one without the pairs at ``needed[name]`` (default: every pair)."""
    path = Path(run_dir) / REFERENCE_FILE
    start_over = "it cannot be recomputed from a trained model: start over with --overwrite"
    try:
        stored = rundir.read_reference(run_dir)["splits"]
    except FileNotFoundError:
        raise UserError(
            f"{path}: missing (DPO's reference log-probabilities, written at step 0); {start_over}"
        ) from None
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{path}: damaged (DPO's reference log-probabilities); {start_over}") from None
    for name, split in splits.items():
        entry = stored.get(name) if isinstance(stored, dict) else None
        if not isinstance(entry, dict) or entry.get("fingerprint") != split.fingerprint():
            raise UserError(
                f"{path}: the {name} split is not the one the reference log-probabilities were computed "
                f"on (the data or its tokenization changed since step 0); {start_over}"
            )
        try:
            values = np.array(
                [[np.nan if v is None else v for v in row] for row in entry["logps"]], dtype=np.float32
            ).reshape(len(split), 2)
        except (KeyError, ValueError, TypeError):
            raise UserError(f"{path}: damaged (DPO's reference log-probabilities); {start_over}") from None
        wanted = list(range(len(split))) if needed is None or name not in needed else list(needed[name])
        if np.isinf(values).any():
            raise UserError(f"{path}: damaged (non-finite reference log-probabilities); {start_over}")
        missing = np.isnan(values[wanted]).any(axis=1)
        if missing.any():
            raise UserError(
                f"{path}: has no reference for {int(missing.sum())} {name} pairs this run draws (it was "
                f"started for fewer steps); {start_over}"
            )
        split.reference = values


def compute_reference(
    model: nn.Module,
    splits: Dict[str, TokenizedSplit],
    run_dir: Path,
    *,
    write: bool,
    batch_size: int,
    pad_id: int,
    needed: Optional[Dict[str, Sequence[int]]] = None,
    log: Callable[[str], None] = print,
) -> None:
    """Give each split its reference, computed from ``model`` (at step 0), and save them (``write``: rank 0).

    ``needed[name]``: the pairs of that split the run will use (default: all): a run of 20
    steps over 10,000 pairs computes 20 batches' worth, not 10,000 pairs.
    """
    counts = []
    for name, split in splits.items():
        indices = (needed or {}).get(name)
        split.reference = reference_logps(model, split, batch_size=batch_size, pad_id=pad_id, indices=indices)
        counts.append(f"{len(split) if indices is None else len(indices)} {name}")
    log(f"reference  log-probabilities of the step-0 model: {', '.join(counts)} pairs, in {REFERENCE_FILE}")
    if write:
        save_reference(run_dir, splits)
    mx.clear_cache()

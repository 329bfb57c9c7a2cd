"""The objectives (sft, dpo, orpo, grpo), one home each, and the registry that maps --train-mode to one.

`objective_of(config)` is the one place a train mode is looked up: the
recipes, evaluation, the card and the compare report ask the objective it
returns (`base.Objective`) instead of testing the mode's name. The list of
choices stays `config.TRAIN_MODES` (config is the bottom layer: the CLI's
flags and the YAML check are built from it, and it cannot import this
package); a test checks that `OBJECTIVES` has exactly those keys. Adding an
objective is a module here and a line in `OBJECTIVES` (and its name in
TRAIN_MODES).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

from gmt_mlx.config import TRAIN_MODES
from gmt_mlx.errors import UserError
from gmt_mlx.objectives.base import Objective
from gmt_mlx.objectives.dpo import DPO
from gmt_mlx.objectives.grpo import GRPO
from gmt_mlx.objectives.orpo import ORPO
from gmt_mlx.objectives.sft import SFT

OBJECTIVES: Dict[str, Objective] = {o.name: o for o in (SFT(), DPO(), ORPO(), GRPO())}


def objective_of(what: Any) -> Objective:
    """The objective of a train mode name, a Config, or a saved config dict (no train_mode: sft, the default)."""
    if isinstance(what, Mapping):
        mode = what.get("train_mode") or "sft"
    elif isinstance(what, str) or what is None:
        mode = what or "sft"
    else:
        mode = what.train_mode
    try:
        return OBJECTIVES[mode]
    except KeyError:
        raise UserError(f"--train-mode must be one of {', '.join(TRAIN_MODES)}, got {mode!r}") from None

"""SFT: the next-token loss on the targets of chat, completion or text rows (`Objective`'s defaults)."""

from __future__ import annotations

from gmt_mlx.objectives.base import Objective


class SFT(Objective):
    """Supervised fine-tuning: every default of `Objective` is SFT's, so nothing is overridden."""

    name = "sft"

"""Parsing of the comma-separated option strings (`gmt-mlx compare --methods sft,gmt ...`)."""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional

from gmt_mlx.config import METHOD_ALIASES, METHODS
from gmt_mlx.errors import UserError


def _items(text: str, what: str) -> List[str]:
    items = [t.strip() for t in str(text).split(",")]
    if not any(items) or not all(items):
        raise UserError(f"--{what} must be a comma-separated list, got {text!r}")
    return items


def _numbers(text: str, what: str, kind: Callable, kind_name: str) -> list:
    try:
        return [kind(item) for item in _items(text, what)]
    except ValueError:
        raise UserError(f"--{what} must be comma-separated {kind_name}, got {text!r}") from None


def parse_methods(text: str) -> List[str]:
    """ "sft,gmt,lora": known methods, each once (an alias such as full counts as its method)."""
    methods = _items(text, "methods")
    for m in methods:
        if m not in METHODS:
            raise UserError(f"--methods: unknown method {m!r} (expected some of {', '.join(METHODS)})")
    methods = [METHOD_ALIASES.get(m, m) for m in methods]
    if len(set(methods)) != len(methods):
        raise UserError(f"--methods lists a method twice: {text}")
    return methods


def method_labels(text: str) -> Dict[str, str]:
    """{method: the alias typed for it} in --methods (full,gmt: {"sft": "full"}), so compare names the run as typed."""
    return {METHOD_ALIASES[m]: m for m in _items(text, "methods") if m in METHOD_ALIASES}


def parse_seeds(text: str) -> List[int]:
    """ "0,1,2": distinct non-negative integers."""
    seeds = _numbers(text, "seeds", int, "integers")
    if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise UserError(f"--seeds must be distinct non-negative integers, got {text!r}")
    return seeds


def parse_mask_ratios(text: str) -> List[float]:
    """ "0.2,0.5": distinct ratios in (0, 1) (0 would be sft)."""
    ratios = _numbers(text, "mask-ratios", float, "numbers")
    for r in ratios:
        if r == 0.0 or not _is_mask_ratio(r):
            raise UserError(f"--mask-ratios must each be in (0, 1) (the fraction dropped; sft is ratio 0), got {r:g}")
    if len(set(ratios)) != len(ratios):
        raise UserError(f"--mask-ratios lists a ratio twice: {text}")
    return ratios


def _is_mask_ratio(value: float) -> bool:
    from gmt_mlx.config import check_mask_ratio

    try:
        check_mask_ratio(value)
    except ValueError:
        return False
    return True


def parse_learning_rates(text: Optional[str]) -> Dict[str, float]:
    """ "1e-4" (every method) or "lora=1e-4,gmt=2e-5" (those methods; others keep their default)."""
    if not text:
        return {}
    out: Dict[str, float] = {}
    for item in _items(text, "learning-rates"):
        method, sep, value = item.partition("=")
        try:
            rate = float(value if sep else method)
        except ValueError:
            raise UserError(f"--learning-rates: {item!r} is not METHOD=RATE or a number") from None
        if rate <= 0 or not math.isfinite(rate):
            raise UserError(f"--learning-rates: {item!r} must be positive")
        method = method.strip()
        if not sep:
            out.update({m: rate for m in METHODS if m not in METHOD_ALIASES})
        elif method not in METHODS:
            raise UserError(f"--learning-rates: unknown method {method!r}")
        else:
            out[METHOD_ALIASES.get(method, method)] = rate
    return out

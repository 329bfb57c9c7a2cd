"""Which methods mask, the mask-ratio rule, the `full` alias, momentum, and config comparison."""

from __future__ import annotations

import pytest

from gmt_mlx import config as cfg
from gmt_mlx.config import Config
from gmt_mlx.errors import UserError


def test_masked_is_a_masking_method_with_a_positive_ratio():
    assert Config(method="gmt").masked and Config(method="random").masked
    assert not Config(method="gmt", mask_ratio=0.0).masked
    assert not any(Config(method=m, mask_ratio=0.5).masked for m in ("sft", "full", "lora", "dora"))


def test_full_is_sft():
    config = Config(method="full").validate()
    assert config.method == "sft" and "full" in cfg.METHODS
    assert cfg.diff(Config(method="sft").to_dict(), config.to_dict()) == {}


@pytest.mark.parametrize("ratio", [1.0, -0.1])  # nan: one finiteness check for all (test_safety_options.py)
def test_mask_ratio_range_is_masking_s_rule(ratio):
    with pytest.raises(UserError, match=r"--mask-ratio must be in \[0, 1\) \(the fraction dropped\), got"):
        Config(mask_ratio=ratio).validate()


@pytest.mark.parametrize("momentum", [1.0, -0.5])
def test_momentum_range(momentum):
    with pytest.raises(UserError, match=r"--momentum must be in \[0, 1\)"):
        Config(optimizer="sgd", momentum=momentum).validate()
    assert Config(optimizer="sgd", momentum=0.9).validate().momentum == 0.9


def test_diff_ignores_keys_that_apply_to_neither_method():
    sft = Config(method="sft").to_dict()
    assert cfg.diff(sft, {**sft, "mask_ratio": 0.7, "mask_scope": "global", "lora_rank": 4}) == {}
    gmt = Config(method="gmt").to_dict()
    assert cfg.diff(gmt, {**gmt, "mask_ratio": 0.7, "lora_rank": 4}) == {"mask_ratio": (0.2, 0.7)}
    lora = Config(method="lora").to_dict()
    assert cfg.diff(lora, {**lora, "mask_ratio": 0.7, "lora_rank": 4}) == {"lora_rank": (8, 4)}
    # A change of method reports the keys that apply to either side.
    assert set(cfg.diff(sft, {**gmt, "mask_ratio": 0.7})) == {"method", "mask_ratio"}

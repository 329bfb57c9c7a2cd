"""Issue 38, case 1: every numeric option is finite or refused in one line, by one check for all of them."""

from __future__ import annotations

import math

import pytest
from typer.testing import CliRunner

from gmt_mlx.cli import app
from gmt_mlx.config import Config, field_types, flag, load_yaml, resolve
from gmt_mlx.errors import UserError

runner = CliRunner()
NUMERIC = [name for name, kind in field_types().items() if kind is float]
CASES = [
    ("learning-rate", "nan"),
    ("learning-rate", "inf"),
    ("weight-decay", "nan"),
    ("min-lr-ratio", "nan"),
    ("lora-scale", "nan"),
    ("grad-clip", "nan"),
    ("temperature", "inf"),
    ("mask-ratio", "nan"),
    ("beta", "-inf"),
    ("epochs", "nan"),
]


@pytest.mark.parametrize("option,value", CASES, ids=[f"{o}={v}" for o, v in CASES])
def test_non_finite_flags_are_refused_in_one_line(tmp_path, option, value):
    """The campaign's --learning-rate nan trained a model of NaNs, rc 0: each is now refused before anything loads."""
    mode = ["--train-mode", "grpo"] if option in ("temperature", "beta") else []
    result = runner.invoke(
        app,
        [
            "finetune",
            "--model",
            str(tmp_path / "nope"),
            "--data",
            str(tmp_path),
            "--out",
            str(tmp_path / "run"),
            *mode,
            f"--{option}",
            value,
        ],
    )
    assert result.exit_code == 2, result.output
    shown = {"nan": "nan", "inf": "inf", "-inf": "-inf"}[value]
    assert result.output.strip().splitlines() == [f"error: --{option} must be a finite number, got {shown}"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", NUMERIC)
def test_every_float_field_is_checked(name):
    """One check covers every float field, including ones added later (no list to forget to extend)."""
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(UserError, match=f"^--{flag(name)} must be a finite number, got "):
            Config(**{name: bad}).validate()


def test_yaml_nan_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: .nan\n")
    assert math.isnan(load_yaml(path)["learning_rate"])  # YAML spells it .nan; it parses...
    with pytest.raises(UserError) as err:  # ...and is refused, named where it was written
        resolve(path)
    assert str(err.value) == f"{path}: learning_rate must be a finite number, got nan"

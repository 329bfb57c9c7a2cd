"""The configs a user starts from (examples/*.yaml): each resolves and validates, its first line is the command
that runs it, every key is commented, and (slow) each trains for 2 steps on the tiny model, so a config whose
data or options do not fit its objective fails here rather than on a user's machine."""

from __future__ import annotations

import json
import re
import shlex
from itertools import pairwise
from pathlib import Path

import pytest

from gmt_mlx.config import Config, load_yaml, resolve
from gmt_mlx.errors import UserError

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
# What the README promises a config for: one per method and per objective, and the two ways to scale.
PROMISED = {"quickstart", "lora", "dora", "dpo", "orpo", "grpo", "low-memory", "several-machines"}
KEY = re.compile(r"^([A-Za-z_]\w*)\s*:")


def command_problems(path: Path, first_line: str) -> list[str]:
    """What is wrong with the first line, which must be the command that runs this very file."""
    if not first_line.startswith("# "):
        return [f"{path.name}:1: the first line must be a comment with the command that runs it"]
    try:
        words = shlex.split(first_line[2:])
    except ValueError as err:
        return [f"{path.name}:1: the command does not parse ({err})"]
    if "gmt-mlx" not in words or words[words.index("gmt-mlx") + 1 :][:1] != ["finetune"]:
        return [f"{path.name}:1: the command must run `gmt-mlx finetune`, got {first_line[2:]!r}"]
    wanted = f"examples/{path.name}"
    if not any(a == "-c" and b == wanted for a, b in pairwise(words)):
        return [f"{path.name}:1: the command must load its own file with `-c {wanted}`, got {first_line[2:]!r}"]
    return []


def comment_problems(path: Path, lines: list[str]) -> list[str]:
    """Keys without a comment on their line or on a comment line right above (the header does not count)."""
    header = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
    problems = []
    for i, line in enumerate(lines):
        match = KEY.match(line)
        if not match:
            continue
        own = re.search(r"\s#", line[match.end() :])
        above = i > header and lines[i - 1].lstrip().startswith("#")
        if not (own or above):
            problems.append(f"{path.name}:{i + 1}: key {match.group(1)!r} has no comment saying what it does")
    return problems


def launch_problems(path: Path, first_line: str, config: Config) -> list[str]:
    """An `mlx.launch -n N` command needs a global batch that N ranks can split, and the backend it names."""
    words = shlex.split(first_line[2:])
    if "mlx.launch" not in words:
        return []
    problems = []
    ranks = int(words[words.index("-n") + 1]) if "-n" in words else None
    if ranks and config.batch_size % ranks:
        problems.append(
            f"{path.name}: batch_size {config.batch_size} is the global batch and must be divisible "
            f"by the {ranks} ranks of its command"
        )
    backend = words[words.index("--backend") + 1] if "--backend" in words else None
    if backend and config.distributed_backend not in ("any", backend):
        problems.append(
            f"{path.name}: distributed_backend {config.distributed_backend} but the command launches "
            f"--backend {backend}"
        )
    return problems


def example_problems(path: Path) -> list[str]:
    """Every way an example config falls short, as one line each (empty: it is fine)."""
    text = path.read_text()
    lines = text.splitlines()
    if not lines:
        return [f"{path.name}: empty"]
    problems = command_problems(path, lines[0]) + comment_problems(path, lines)
    try:
        config = resolve(path)
    except UserError as err:
        return problems + [f"{path.name}: {err}"]
    if not problems:
        problems += launch_problems(path, lines[0], config)
    if not config.data or not (REPO / config.data / "train.jsonl").is_file():
        problems.append(f"{path.name}: data {config.data!r} is not a shipped folder with a train.jsonl")
    if config.model != "smollm2-135m":
        problems.append(f"{path.name}: model {config.model!r}: the examples use the embedded smollm2-135m")
    return problems


def test_every_promised_example_is_there():
    assert PROMISED <= {p.stem for p in EXAMPLES}, f"missing: {sorted(PROMISED - {p.stem for p in EXAMPLES})}"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_config_is_complete(path):
    assert example_problems(path) == []
    values = load_yaml(path)
    config = resolve(path)
    for key, value in values.items():  # what the file says is what the run gets
        assert getattr(config, key) == value, key


SUMS = "data: examples/data/sums  # the quickstart's rows"
BAD = {  # name: (the planted file's lines, what its problem must say)
    "no-command": (["# LoRA, briefly", "method: lora  # adapters", SUMS], "must run `gmt-mlx finetune`"),
    "other-file": (["# gmt-mlx finetune -c examples/lora.yaml", "method: lora  # adapters", SUMS], "its own file"),
    "silent-key": (
        ["# gmt-mlx finetune -c examples/silent-key.yaml", "method: lora", SUMS],
        "key 'method' has no comment",
    ),
    "unknown-key": (["# gmt-mlx finetune -c examples/unknown-key.yaml", "methd: lora  # typo", SUMS], "methd"),
    "bad-value": (
        ["# gmt-mlx finetune -c examples/bad-value.yaml", "mask_ratio: 1.5  # too much", SUMS],
        "mask_ratio must be in [0, 1)",  # named as the file's key (issue 38), not as a flag
    ),
    "no-data": (["# gmt-mlx finetune -c examples/no-data.yaml", "data: examples/data/nowhere  # gone"], "data"),
    "odd-batch": (
        [
            "# mlx.launch -n 2 --backend ring -- gmt-mlx finetune -c examples/odd-batch.yaml",
            "batch_size: 3  # odd",
            SUMS,
        ],
        "divisible",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_planted_bad_example_is_caught(tmp_path, name):
    """The checks above can fail: each planted config breaks one rule and is reported for it."""
    lines, expected = BAD[name]
    path = tmp_path / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    problems = example_problems(path)
    assert any(expected in problem for problem in problems), problems


def short_run(path: Path, model_dir: Path, out: Path) -> Config:
    """The example's own config on the tiny model for 2 steps (its data, method and objective unchanged)."""
    config = resolve(path)
    return resolve(
        path,
        overrides={
            "model": str(model_dir),
            "data": str(REPO / config.data),
            "out": str(out),
            "iters": 2,
            "epochs": None,
            "samples": 0,
            "val_batches": 1,
            "steps_per_report": 1,
            "steps_per_save": 0,
        },
    )


@pytest.mark.slow
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_config_trains(path, tiny_model_dir, tmp_path):
    from gmt_mlx.recipes.finetune import finetune

    config = short_run(path, tiny_model_dir, tmp_path / "run")
    finetune(config, log=lambda line: None)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    # The objective the file names is the one that ran: its own metrics are there.
    wanted = {"dpo": "reward_accuracy", "orpo": "reward_accuracy", "grpo": "reward"}.get(config.train_mode)
    assert wanted is None or wanted in train[0], (config.train_mode, sorted(train[0]))
    assert any(r["type"] == "eval" for r in records)
    assert (tmp_path / "run" / "model" / "config.json").is_file()


@pytest.mark.slow
def test_an_example_whose_data_does_not_fit_its_objective_fails(tiny_model_dir, tmp_path):
    """The run above can fail: DPO's config pointed at the chat rows of the sums is refused before training."""
    from gmt_mlx.recipes.finetune import finetune

    bad = tmp_path / "dpo.yaml"
    bad.write_text((REPO / "examples" / "dpo.yaml").read_text().replace("examples/data/prefs", "examples/data/sums"))
    with pytest.raises(UserError, match="prompt/chosen/rejected"):
        finetune(short_run(bad, tiny_model_dir, tmp_path / "run"), log=lambda line: None)

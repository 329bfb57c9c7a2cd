"""Config's option groups, and every default written once (issue 33).

The groups (config.MaskOptions, OptimizerOptions, ...) are Config's own fields, so
they cannot drift from it; the scan below finds a module that writes one of
Config's defaults again as a literal (a keyword default, a dataclass field, a
DEFAULT_<FIELD> constant), where it should be required or come from Config.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from gmt_mlx import config as cfg
from gmt_mlx.config import Config

PACKAGE = Path(__file__).resolve().parent.parent / "gmt_mlx"
# Parameters that name a Config field under another name (the fields they stand for).
ALIASES = {
    "sample_size": "mask_sample_size",
    "scope": "mask_scope",
    "target": "mask_target",
    "weights_dtype": "train_dtype",
    "kind": "lr_schedule",
    "dpo_loss_type": "dpo_loss",
    "lam": "orpo_lambda",
    "rewards": "reward",
    "eval_batch_size": "batch_size",
}
# Literals the scan finds that equal a Config default by coincidence, not as a second copy of it:
# "function(parameter)" -> why the value is its own. Keep this list short; a real repeat is removed, not listed.
COINCIDENCES = {
    "make_tiny_model(seed)": "models/tiny.py: the test model's own initialisation seed, not a run's --seed",
}


def _defaults() -> dict:
    """Each field's default as a run sees it (beta per mode: DPO's, and GRPO's)."""
    out = {f.name: {f.default} for f in dataclasses.fields(Config)}
    for mode in cfg.TRAIN_MODES:
        out["beta"].add(Config(train_mode=mode).beta)
    return {name: {v for v in values if v is not None} for name, values in out.items()}


def _literal(node: ast.AST, constants: dict):
    """The value of a literal default (or of a module constant bound to one); None when it is not one."""
    if isinstance(node, ast.Name) and node.id in constants:
        return constants[node.id]
    try:
        return ast.literal_eval(node)
    except ValueError:
        return None


def duplicated_defaults(source: str) -> list:
    """ "function(parameter)" (or "Class.field", "CONSTANT") for every literal in ``source`` equal to the
    default of the Config field it names: the same value written a second time."""
    tree = ast.parse(source)
    defaults = _defaults()
    constants = {}
    found = []

    def check(where: str, name: str, node: ast.AST) -> None:
        value = _literal(node, constants)
        field_name = ALIASES.get(name, name)
        if value is None or field_name not in defaults:
            return
        # bool is an int: True must not match a default of 1.
        if any(value == d and type(value) is type(d) for d in defaults[field_name]):
            found.append(where)

    for node in tree.body:  # module constants first, so that a default naming one is resolved
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            value = _literal(node.value, {})
            if value is not None:
                constants[name] = value
            if name.startswith("DEFAULT_"):
                check(name, name[len("DEFAULT_") :].lower(), node.value)

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                for stmt in child.body:
                    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value:
                        check(f"{child.name}.{stmt.target.id}", stmt.target.id, stmt.value)
                visit(child, f"{child.name}.")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = child.args
                positional = args.posonlyargs + args.args
                pairs = list(zip(positional[len(positional) - len(args.defaults) :], args.defaults))
                pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
                for arg, default in pairs:
                    check(f"{prefix}{child.name}({arg.arg})", arg.arg, default)
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def test_the_scan_finds_a_duplicated_default():
    # What issue 33 found: 65536 in masking.py beside config.py, beta 0.1 in losses.py.
    source = (
        "DEFAULT_SAMPLE_SIZE = 65536\n"
        "def gmt_masks(grads, sample_size: int = DEFAULT_SAMPLE_SIZE): ...\n"
        "def make_loss(train_mode, *, beta: float = 0.1): ...\n"
        "class Options:\n    batch_size: int = 4\n"
        "def fine(seed=None, mask_ratio=0.5, update_per_layer=True, iters=True): ...\n"
    )
    assert duplicated_defaults(source) == [
        "DEFAULT_SAMPLE_SIZE",
        "gmt_masks(sample_size)",
        "make_loss(beta)",
        "Options.batch_size",
    ]


def test_no_module_repeats_a_config_default():
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "config.py" and path.parent == PACKAGE:
            continue
        for where in duplicated_defaults(path.read_text()):
            if where not in COINCIDENCES:
                found[where] = str(path.relative_to(PACKAGE))
    assert not found, f"Config's defaults written again (require them, or take them from config): {found}"


def test_every_field_is_in_a_group_and_groups_hold_config_fields():
    grouped = {f.name for group in cfg.GROUPS.values() for f in dataclasses.fields(group)}
    every = {f.name for f in dataclasses.fields(Config)}
    assert grouped | set(cfg.RUN_FIELDS) == every
    assert not grouped & set(cfg.RUN_FIELDS)
    for group in cfg.GROUPS.values():
        for f in dataclasses.fields(group):
            mine = Config.__dataclass_fields__[f.name]
            assert (f.default, f.metadata, f.type) == (mine.default, mine.metadata, mine.type), f.name


def test_a_group_is_the_configs_values():
    config = Config(
        mask_ratio=0.3,
        mask_scope="layer",
        optimizer="sgd",
        momentum=0.5,
        train_dtype="bfloat16",
        train_mode="grpo",
        num_generations=3,
    )
    assert config.mask == cfg.MaskOptions(mask_ratio=0.3, mask_scope="layer")
    assert (config.optim.optimizer, config.optim.momentum) == ("sgd", 0.5)
    assert config.precision.train_dtype == "bfloat16"
    assert (config.grpo.num_generations, config.grpo.beta) == (3, 0.0)
    assert cfg.DataOptions.of(config).max_seq_length == config.max_seq_length
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.mask.mask_ratio = 0.5


def test_masked_means_a_masking_method_that_drops_something():
    assert cfg.MaskOptions().masked and cfg.MaskOptions(method="random").masked
    assert not cfg.MaskOptions(mask_ratio=0.0).masked
    assert not cfg.MaskOptions(method="lora").masked and not Config(method="full").masked


def test_a_group_names_only_config_fields():
    with pytest.raises(TypeError, match="not a Config field"):
        cfg.options_group(type("Bad", (), {"__annotations__": {"ratio": "float"}}))
    with pytest.raises(TypeError, match="not Config's"):
        cfg.options_group(type("Bad", (), {"__annotations__": {"mask_ratio": "int"}}))

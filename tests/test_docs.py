"""The docs, checked: the mkdocs site builds in --strict mode, the CLI reference is current, and every
path, module and gmt-mlx flag that README.md, docs/ and benchmarks/README.md name exists.

Which files: README.md, benchmarks/README.md and docs/**/*.md except the raw-result folders
(docs/evidence/, docs/compare_chain_sum/), whose pages are written by the study scripts.
Flags: every `--flag` in those files must be an option of some gmt-mlx command (collected from
the click commands Typer builds) or be listed in OTHER_TOOLS_FLAGS with the tool it belongs to.
Each check also runs on a planted error, so none of them can pass by finding nothing.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RAW_RESULTS = ("docs/evidence/", "docs/compare_chain_sum/")

# Flags the docs name that belong to other tools (or to our benchmark and study scripts), never
# to a gmt-mlx command. A flag missing here and from the CLI fails the test: add it with its tool.
OTHER_TOOLS_FLAGS = {
    "--backend": "mlx.launch",
    "--hostfile": "mlx.launch",
    "--fine-tune-type": "mlx_lm lora",
    "--dpo-cpo-loss-type": "mlx-lm-lora",
    "--dataset-config": "TRL (named as the equivalent of our --data-config)",
    "--no-deps": "pip",
    "--strict": "mkdocs",
    "--check": "ruff format, scripts/gen_cli_reference.py",
    "--logdir": "tensorboard",
    "--mask-ration": "a misspelt flag on purpose: docs/bad-input.md shows what it prints",
    # benchmarks/*.py
    "--before": "benchmarks/bench.py",
    "--models": "benchmarks/bench.py",
    "--no-blas": "benchmarks/bench.py",
    "--quick": "benchmarks/bench.py",
    "--sections": "benchmarks/bench.py, bench_grpo.py",
    "--steps": "benchmarks/bench.py",
    "--reps": "benchmarks/loop_profile.py, bench_grpo.py",
    "--cold-cache": "benchmarks/bench_grpo.py",
    "--pairs": "benchmarks/bench_grpo.py",
    "--reencode-prompts": "benchmarks/bench_grpo.py",
    "--reencode-tokens": "benchmarks/bench_grpo.py",
    "--contender": "benchmarks/bench_memory.py",
    "--shape": "benchmarks/bench_memory.py",
    "--no-mlx-lm": "benchmarks/bench_memory.py",
    "--reference": "benchmarks/estimate_check.py",
    "--runs": "benchmarks/estimate_check.py",
    # studies/*.py
    "--answers": "studies/evidence_tables.py",
    "--pick-lr": "studies/evidence_tables.py",
    "--pick-ratio": "studies/evidence_tables.py",
    "--collect": "studies/ceiling_study.py, grpo_study.py",
}

PATH_PREFIXES = ("examples", "studies", "benchmarks", "scripts", "docs", "tests", "gmt_mlx")
# A path starts after a space, quote, bracket or backtick (not inside a longer path or URL).
PATH_RE = re.compile(r"(?<![\w./~-])(?:" + "|".join(PATH_PREFIXES) + r")/[\w./{},*<>-]*")
MODULE_RE = re.compile(r"(?<![\w.])gmt_mlx(?:\.\w+)+")
FLAG_RE = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*")


def doc_files() -> list:
    """The Markdown files whose paths and flags are checked (see the module docstring)."""
    docs = sorted(
        p for p in (ROOT / "docs").rglob("*.md") if not p.relative_to(ROOT).as_posix().startswith(RAW_RESULTS)
    )
    return [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *docs]


def _label(doc: Path) -> str:
    """A file's name in a report: relative to the repository when it is inside it."""
    return str(doc.relative_to(ROOT)) if doc.is_relative_to(ROOT) else str(doc)


def named_paths(text: str) -> list:
    """(path, is a Markdown link target) for every repository path a text names, as written, without
    the ones that are patterns or placeholders."""
    found = []
    for match in PATH_RE.finditer(text):
        path = match.group().split("#")[0].rstrip(".,:;")
        if any(c in path for c in "{}*<>") or any(part.isupper() for part in path.split("/")):
            continue  # docs/evidence/{a,b}/..., full-<names>.*, docs/evidence/STUDY/...: a pattern, not a path
        found.append((path, text[: match.start()].endswith("](")))
    return found


def missing_paths(files: list) -> list:
    """``file:line: path`` for every named path that does not exist in the repository."""
    missing = []
    for doc in files:
        for number, line in enumerate(doc.read_text().split("\n"), 1):
            for path, is_link in named_paths(line):
                # A Markdown link is relative to its page; a path in text or code, to the repository.
                if not (doc.parent if is_link else ROOT).joinpath(path.rstrip("/")).exists():
                    missing.append(f"{_label(doc)}:{number}: {path}")
    return missing


def _module_exists(dotted: str) -> bool:
    """Whether ``gmt_mlx.a.b[.name]`` is a module or package of the source tree, or a name defined
    at the top of one (read from the source, nothing imported)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:cut])
        source = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
        if not source.exists():
            continue
        rest = parts[cut:]
        if not rest:
            return True
        if len(rest) > 1:
            return False
        return (
            re.search(rf"^(def|class|async def) {rest[0]}\b|^{rest[0]}\s*[:=]", source.read_text(), re.MULTILINE)
            is not None
        )
    return False


def missing_modules(files: list) -> list:
    """``file:line: name`` for every dotted ``gmt_mlx.…`` name that is no module or top-level name."""
    missing = []
    for doc in files:
        for number, line in enumerate(doc.read_text().split("\n"), 1):
            for match in MODULE_RE.finditer(line):
                if not _module_exists(match.group()):
                    missing.append(f"{_label(doc)}:{number}: {match.group()}")
    return missing


def cli_flags() -> set:
    """Every long option of every gmt-mlx command, from the click commands Typer builds."""
    import click
    import typer.main

    from gmt_mlx.cli import app

    group = typer.main.get_command(app)
    flags = {"--help"}
    for name, command in group.commands.items():
        ctx = click.Context(command, info_name=name)
        for param in command.get_params(ctx):
            flags.update(o for o in [*param.opts, *param.secondary_opts] if o.startswith("--"))
    return flags


def unknown_flags(files: list, known: set) -> list:
    """``file:line: --flag`` for every flag that is neither a gmt-mlx option nor another tool's."""
    unknown = []
    for doc in files:
        for number, line in enumerate(doc.read_text().split("\n"), 1):
            for match in FLAG_RE.finditer(line):
                if match.group() not in known and match.group() not in OTHER_TOOLS_FLAGS:
                    unknown.append(f"{_label(doc)}:{number}: {match.group()}")
    return unknown


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    """``mkdocs build --strict`` of ``config`` into ``site``."""
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _require_mkdocs() -> None:
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.fail("mkdocs and mkdocs-material are needed (they are in the test extra): pip install -e '.[test]'")


def test_mkdocs_strict_build(tmp_path):
    """The site builds with --strict: a broken link, a missing anchor or a page outside docs/ fails it."""
    _require_mkdocs()
    result = mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}{result.stderr}"


def test_mkdocs_strict_build_fails_on_a_broken_link(tmp_path):
    """The planted error: the same site with one link to a page that does not exist does not build."""
    _require_mkdocs()
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    with open(tmp_path / "docs" / "index.md", "a") as page:
        page.write("\nSee [a page that is not there](no-such-page.md).\n")
    result = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0 and "no-such-page.md" in result.stdout + result.stderr


def test_cli_reference_is_current():
    """docs/reference/cli.md is what scripts/gen_cli_reference.py makes of the commands today."""
    spec = importlib.util.spec_from_file_location("gen_cli_reference", ROOT / "scripts" / "gen_cli_reference.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    committed = gen.OUTPUT.read_text() if gen.OUTPUT.exists() else ""
    assert committed == gen.render(), f"docs/reference/cli.md is stale: run {gen.COMMAND}"
    assert "`--mask-ratio <float>`" in committed and "## gmt-mlx export" in committed


def test_named_paths_exist():
    """Every examples/, studies/, benchmarks/, scripts/, docs/, tests/ and gmt_mlx/ path named exists."""
    missing = missing_paths(doc_files())
    assert not missing, f"{len(missing)} named paths do not exist:\n" + "\n".join(missing)


def test_named_modules_exist():
    """Every dotted gmt_mlx.… name (a module, or a function of one) exists in the source."""
    missing = missing_modules(doc_files())
    assert not missing, f"{len(missing)} named modules or names do not exist:\n" + "\n".join(missing)


def test_named_flags_exist():
    """Every --flag named is an option of a gmt-mlx command, or another tool's (OTHER_TOOLS_FLAGS)."""
    unknown = unknown_flags(doc_files(), cli_flags())
    assert not unknown, (
        f"{len(unknown)} flags are no gmt-mlx option (add another tool's to OTHER_TOOLS_FLAGS):\n" + "\n".join(unknown)
    )


def test_readme_contents_links_and_length():
    """The README stays a five-minute read, and its in-page links name its own headings."""
    text = (ROOT / "README.md").read_text()
    assert len(text.split("\n")) <= 400
    anchors = {github_slug(h) for h in re.findall(r"^#{1,4} (.+)$", text, re.MULTILINE)}
    links = set(re.findall(r"\]\(#([\w-]+)\)", text))
    assert links and not links - anchors, f"README links to missing headings: {sorted(links - anchors)}"


def test_checks_catch_planted_errors(tmp_path):
    """Each path, module and flag check reports a planted mistake (and passes a correct line)."""
    page = tmp_path / "page.md"
    page.write_text(
        "Run `gmt-mlx finetune --mask-ratio 0.2 --mask-ratoi 0.3` (gmt_mlx/core/masking.py,\n"
        "gmt_mlx/masking.py, examples/data/sums/, docs/nowhere.md, studies/{a,b}.py).\n"
        "Library: gmt_mlx.core.masking.gmt_masks, gmt_mlx.core.masking.no_such_function, gmt_mlx.nope.\n"
    )
    paths, modules, flags = missing_paths([page]), missing_modules([page]), unknown_flags([page], cli_flags())
    assert [p.split(": ")[1] for p in paths] == ["gmt_mlx/masking.py", "docs/nowhere.md"]
    assert [m.split(": ")[1] for m in modules] == ["gmt_mlx.core.masking.no_such_function", "gmt_mlx.nope"]
    assert [f.split(": ")[1] for f in flags] == ["--mask-ratoi"]

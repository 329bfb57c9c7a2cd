"""GGUF exports a newcomer makes (issue 37): several --outtype files share one --out folder without
--overwrite (a same-type re-export still needs it), and a GGUF folder is pushed with its card."""

from __future__ import annotations

import hashlib
from unittest import mock

import pytest

from gmt_mlx.cli import app
from tests.helpers import arithmetic_chat, runner, write_jsonl

pytest.importorskip("gguf")
huggingface_hub = pytest.importorskip("huggingface_hub")


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def digest(folder) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("newcomer-gguf")
    write_jsonl(root / "data" / "train.jsonl", arithmetic_chat(8))
    result = cli(
        "finetune",
        "--model",
        tiny_model_dir,
        "--data",
        root / "data",
        "--out",
        root / "run",
        "--iters",
        "2",
        "--batch-size",
        "2",
        "--samples",
        "0",
    )
    assert result.exit_code == 0, result.output
    return root / "run"


@pytest.fixture(scope="module")
def two_types(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "smol"
    for outtype in ("q8_0", "q4_0"):
        result = cli("export", run, "--out", out, "--format", "gguf", "--outtype", outtype)
        assert result.exit_code == 0, result.output
        assert f"publish it: gmt-mlx push {out} --repo USER/NAME" in result.output
    return out


def test_two_gguf_types_share_one_folder(two_types):
    out = two_types
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "README.md", "smol-q4_0.gguf", "smol-q8_0.gguf"]
    assert "FROM ./smol-q4_0.gguf" in (out / "Modelfile").read_text()  # the newest export
    card = (out / "README.md").read_text()
    assert "(`smol-q4_0.gguf`, `smol-q8_0.gguf`; one file per quantization)" in card
    assert "library_name: gguf" in card and "transformers" not in card.split("## Usage")[1]


def test_a_same_type_re_export_still_needs_overwrite(run, two_types, tmp_path):
    out = two_types
    before = digest(out)
    again = cli("export", run, "--out", out, "--format", "gguf", "--outtype", "q8_0")
    assert again.exit_code == 2 and "Traceback" not in again.output
    assert again.output.strip().splitlines()[-1] == (
        f"error: --out {out} already holds smol-q8_0.gguf; pass --overwrite to replace the folder, "
        "or choose another --outtype (each type has its own file) or --out"
    )
    assert digest(out) == before
    # An HF export's folder is no GGUF folder: a GGUF into it still needs --overwrite.
    assert cli("export", run, "--out", tmp_path / "hf").exit_code == 0
    into_hf = cli("export", run, "--out", tmp_path / "hf", "--format", "gguf")
    assert into_hf.exit_code == 2 and "already holds a model; pass --overwrite" in into_hf.output


def test_a_gguf_folder_is_pushed_with_its_card(two_types, monkeypatch):
    out = two_types
    dry = cli("push", out, "--repo", "me/smol-gguf", "--dry-run")
    assert dry.exit_code == 0, dry.output
    for name in ("Modelfile", "README.md", "smol-q4_0.gguf", "smol-q8_0.gguf"):
        assert f"  {name} " in dry.output
    assert "ollama run hf.co/me/smol-gguf:Q8_0" in dry.output and "llama-cli -hf me/smol-gguf:Q4_0" in dry.output

    api_class = mock.create_autospec(huggingface_hub.HfApi)
    api = api_class.return_value
    api.create_repo.return_value = "https://huggingface.co/me/smol-gguf"
    api.upload_folder.return_value = mock.Mock(commit_url="https://huggingface.co/me/smol-gguf/commit/abc")
    monkeypatch.setattr(huggingface_hub, "HfApi", api_class)
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")
    pushed = cli("push", out, "--repo", "me/smol-gguf")
    assert pushed.exit_code == 0, pushed.output
    assert api.upload_folder.call_args.kwargs["folder_path"] == str(out)
    assert "pushed 4 files to https://huggingface.co/me/smol-gguf" in pushed.output
    assert "hf.co/me/smol-gguf:Q4_0" in (out / "README.md").read_text()  # the card now names the repo

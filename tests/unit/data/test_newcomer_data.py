"""What a newcomer tripped on (issue 37), in the data: columns that no format reads are a warning naming
them (once per file, with the count), a --columns target no format reads is an error, --columns on plain
JSONL needs no `datasets`, and the unknown-format error names --columns."""

from __future__ import annotations

import sys

import pytest

from gmt_mlx.cli import app
from gmt_mlx.data.sources import column_warnings, load_splits
from gmt_mlx.errors import UserError
from tests.helpers import runner, write_jsonl

ALPACA = "instruction=prompt,output=completion"


def alpaca(n: int, start: int = 0) -> list:
    """Alpaca rows whose `input` is what tells two equal instructions apart."""
    return [
        {"instruction": "Convert to meters.", "input": f"{i} km", "output": f"{i}000 m"}
        for i in range(start, start + n)
    ]


@pytest.fixture()
def no_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails as if not installed


def test_columns_on_plain_jsonl_need_no_datasets(tmp_path, no_datasets):
    write_jsonl(tmp_path / "d" / "train.jsonl", alpaca(2))
    for data in (tmp_path / "d", tmp_path / "d" / "train.jsonl"):
        rows = load_splits(data, ALPACA)["train"]
        assert rows == [
            {"prompt": "Convert to meters.", "input": "0 km", "completion": "0000 m"},
            {"prompt": "Convert to meters.", "input": "1 km", "completion": "1000 m"},
        ]


@pytest.mark.parametrize(
    "columns, fragments",
    [
        (
            "instructoin=prompt,output=completion",
            ["train.jsonl: no column 'instructoin' (named in --columns", "columns: instruction, input, output"],
        ),
        (
            "instruction=prompt,input=context,output=completion",
            ["train.jsonl:1: --columns maps 'input' to 'context', which completions rows do not read"],
        ),
        ("instruction=prompt", ["train.jsonl:1: has 'prompt' (column 'instruction') but no 'completion'"]),
        ("instruction=prompt,output=completion,input=prompt", ["--columns: two entries map to 'prompt'"]),
    ],
)
def test_bad_columns_on_jsonl_are_one_line(tmp_path, no_datasets, columns, fragments):
    write_jsonl(tmp_path / "d" / "train.jsonl", alpaca(2))
    with pytest.raises(UserError) as info:
        load_splits(tmp_path / "d", columns)
    message = str(info.value)
    assert "\n" not in message and all(f in message for f in fragments), message


def test_a_row_holding_a_source_and_its_target_is_refused(tmp_path, no_datasets):
    write_jsonl(tmp_path / "t.jsonl", [{"question": "q", "prompt": "p", "completion": "c"}])
    with pytest.raises(UserError, match=r"t\.jsonl:1: --columns maps 'question' to 'prompt', but the line has"):
        load_splits(tmp_path / "t.jsonl", "question=prompt")


def test_unknown_format_error_names_columns(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", [{"question": "q", "reply": "r"}])
    with pytest.raises(UserError, match=r"keys found: question, reply; map yours with --columns, e\.g\. --columns "):
        load_splits(tmp_path / "t.jsonl")


def test_unused_columns_warn_once_per_file_with_the_count(tmp_path):
    write_jsonl(tmp_path / "d" / "train.jsonl", alpaca(3) + [{"instruction": "x", "output": "y"}])
    write_jsonl(tmp_path / "d" / "valid.jsonl", alpaca(2, 10))
    splits = load_splits(tmp_path / "d", ALPACA)
    lines = column_warnings(tmp_path / "d", splits, ALPACA)
    assert lines == [
        (
            f"warning: {tmp_path / 'd' / 'train.jsonl'}: completions rows do not read these columns, which are "
            f"ignored: "
            "input (3 of 4 rows); to train on them, fold them into the prompt or completion"
        ),
        (
            f"warning: {tmp_path / 'd' / 'valid.jsonl'}: completions rows do not read these columns, which are "
            f"ignored: "
            "input (2 of 2 rows); to train on them, fold them into the prompt or completion"
        ),
    ]


def test_columns_something_reads_give_no_warning(tmp_path):
    rows = [
        {
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
            "tools": [],
            "answer": "yo",
            "metadata": {"source_dataset": "x"},
        }
    ]
    write_jsonl(tmp_path / "chat.jsonl", rows)
    assert column_warnings(tmp_path / "chat.jsonl", load_splits(tmp_path / "chat.jsonl")) == []
    # GRPO's prompt rows: every column goes to the rewards (a --reward module:function may read any).
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2?", "answer": "4", "difficulty": 1}])
    assert column_warnings(tmp_path / "p.jsonl", load_splits(tmp_path / "p.jsonl", prompts=True), prompts=True) == []
    write_jsonl(tmp_path / "pref.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b", "system": "s", "score": 1}])
    [line] = column_warnings(tmp_path / "pref.jsonl", load_splits(tmp_path / "pref.jsonl"))
    assert "preference rows do not read these columns" in line and "score (1 of 1 rows)" in line


def test_finetune_warns_about_alpaca_input(tiny_model_dir, tmp_path, no_datasets):
    write_jsonl(tmp_path / "d" / "train.jsonl", alpaca(4))
    result = runner.invoke(
        app,
        [
            "finetune",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(tmp_path / "d"),
            "--columns",
            ALPACA,
            "--out",
            str(tmp_path / "run"),
            "--iters",
            "1",
            "--batch-size",
            "2",
            "--samples",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if "do not read these columns" in line]
    assert len(warnings) == 1 and "train.jsonl" in warnings[0] and "input (4 of 4 rows)" in warnings[0]


def test_a_dataset_column_mapped_to_a_field_no_format_reads_is_refused(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(alpaca(2)).to_parquet(tmp_path / "a.parquet")
    with pytest.raises(UserError, match=r"split train: --columns maps 'input' to 'context', which completions rows"):
        load_splits(tmp_path / "a.parquet", "instruction=prompt,input=context,output=completion")
    rows = load_splits(tmp_path / "a.parquet", ALPACA)
    [line] = column_warnings(tmp_path / "a.parquet", rows, ALPACA)
    assert line.startswith(f"warning: dataset {tmp_path / 'a.parquet'}, split train: ") and "input (2 of 2" in line

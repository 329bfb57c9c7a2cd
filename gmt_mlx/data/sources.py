"""Data that is not JSONL: parquet, CSV and JSON files, `save_to_disk` folders, Hub dataset ids.

`data.load_splits` hands these to `load_source`, which reads them with the
`datasets` library (the optional extra `pip install 'gmt-mlx[datasets]'`,
imported here and only when such a source is asked for) and returns the same
{split: rows} as a JSONL folder: split names train / valid / test (the Hub's
"validation" is valid), every row renamed by `--columns` and checked by
`data.detect_format`, each error one line naming the dataset, split, row and
column. Nothing is written but what `datasets` itself caches
(HF_DATASETS_CACHE, as for any `load_dataset`).
"""

from __future__ import annotations

import contextlib
import csv
import re
from pathlib import Path
from typing import Dict, List, Optional

from gmt_mlx.data.formats import SPLITS, read_jsonl
from gmt_mlx.errors import UserError

INSTALL = "pip install 'gmt-mlx[datasets]'"
# File suffix -> the `datasets` builder that reads it (.jsonl only when --columns/--data-splits ask).
FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json"}
# A dataset's split name -> ours, in order of preference when both are there (validation over valid over dev).
SPLIT_NAMES = {"train": "train", "validation": "valid", "valid": "valid", "dev": "valid", "test": "test"}
OUR_SPLITS = ("train", "valid", "test")
# The columns of the row formats detect_format knows; a dataset with none of them needs --columns.
FORMAT_COLUMNS = ("messages", "prompt", "completion", "text", "chosen", "rejected")
_EXAMPLE_MAPPING = "--columns question=prompt,answer=completion"


# The Config fields (and load_splits keywords) that say how to read --data, besides --data itself.
DATA_KEYS = ("columns", "data_config", "data_splits")


def data_options(config) -> Dict[str, Optional[str]]:
    """{columns, data_config, data_splits} of a Config or a saved config dict: load_splits' keywords."""
    get = config.get if isinstance(config, dict) else (lambda key: getattr(config, key, None))
    return {key: get(key) for key in DATA_KEYS}


def is_saved_dataset(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` (state.json) or `DatasetDict.save_to_disk` (dataset_dict.json)."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def wants_datasets(
    data: str, columns: Optional[str] = None, data_config: Optional[str] = None, data_splits: Optional[str] = None
) -> bool:
    """Whether ``data`` (with these options) is read here rather than by data.py's JSONL reader.

    Here: a .parquet/.csv/.tsv/.json file, a `save_to_disk` folder, a Hub id (owner/name that is
    no local path), and any data with --data-config or --data-splits. JSONL with --columns is
    data.py's: renaming needs no `datasets` (the README says JSONL needs none of it).
    """
    from gmt_mlx.hub import is_hub_id, looks_like_path

    path = Path(data).expanduser()
    if data_config or data_splits:
        return True
    if path.exists():
        return (
            path.is_file() and path.suffix.lower() in FILE_BUILDERS and path.suffix.lower() != ".jsonl"
        ) or is_saved_dataset(path)
    return is_hub_id(data) and not looks_like_path(data) and path.suffix.lower() not in FILE_BUILDERS


def parse_pairs(text: Optional[str], option: str, example: str) -> Dict[str, str]:
    """'a=b,c=d' -> {'a': 'b', 'c': 'd'}; a UserError naming ``option`` for anything else."""
    pairs: Dict[str, str] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        source, sep, target = (part.strip() for part in item.partition("="))
        if not sep or not source or not target:
            raise UserError(f"{option}: expected SOURCE=NAME pairs like {example}, got {item.strip()!r}")
        if source in pairs:
            raise UserError(f"{option}: {source!r} is mapped twice")
        pairs[source] = target
    targets = list(pairs.values())
    for target in targets:
        if targets.count(target) > 1:
            raise UserError(f"{option}: two entries map to {target!r}")
    return pairs


def _import_datasets(data: str):
    try:
        import datasets
    except ImportError:
        what = (
            "reading it"
            if Path(data).expanduser().exists()
            else "no such file or folder, and reading it as a Hub dataset"
        )
        raise UserError(f"{data}: {what} needs the datasets library: {INSTALL}") from None
    return datasets


@contextlib.contextmanager
def _quiet(datasets):
    """No progress bars or cache warnings from `datasets` while we read; its settings restored after."""
    verbosity = datasets.logging.get_verbosity()
    bars_were_off = datasets.are_progress_bars_disabled()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not bars_were_off:
            datasets.enable_progress_bars()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0].strip() if text else type(err).__name__)[:300]


def _csv_kwargs(path: Path, datasets) -> dict:
    """Every CSV column read as text (an answer column of digits stays "42", not 42; empty stays "")."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f, delimiter=delimiter), [])
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"dataset {path}: cannot read it ({_first_line(err)})") from None
    if not header:
        raise UserError(f"dataset {path}: no examples")
    features = datasets.Features({name: datasets.Value("string") for name in header})
    return {"features": features, "sep": delimiter, "keep_default_na": False, "na_filter": False}


def _load(data: str, data_config: Optional[str], datasets) -> dict:
    """{dataset split name: datasets.Dataset} of ``data``, every failure of `datasets` a UserError."""
    path = Path(data).expanduser()
    label = f"dataset {data}"
    if data_config and path.exists():
        raise UserError(f"--data-config {data_config} names a configuration of a Hub dataset; {data} is a local path")
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise UserError(
                f"{label}: unknown file type {path.suffix or '(none)'} (expected .jsonl, .parquet, .csv, .tsv or .json)"
            )
        read = lambda: datasets.load_dataset(  # noqa: E731
            builder, data_files={"train": str(path)}, **(_csv_kwargs(path, datasets) if builder == "csv" else {})
        )
    elif is_saved_dataset(path):
        read = lambda: datasets.load_from_disk(str(path))  # noqa: E731
    elif path.is_dir():  # a JSONL folder read here for --columns / --data-splits
        files = {name: str(path / f"{name}.jsonl") for name in OUR_SPLITS if (path / f"{name}.jsonl").is_file()}
        if "train" not in files:
            raise UserError(f"{path}: no train.jsonl, and not a folder written by datasets' save_to_disk")
        read = lambda: datasets.load_dataset("json", data_files=files)  # noqa: E731
    else:
        read = lambda: datasets.load_dataset(data, name=data_config)  # noqa: E731
    try:
        with _quiet(datasets):
            loaded = read()
    except UserError:
        raise
    except ConnectionError as err:  # offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) or no network, and not cached
        raise UserError(
            f"{data}: no such file or folder, and the Hub dataset {data} is not in the local dataset cache "
            f"({datasets.config.HF_DATASETS_CACHE}) while the Hub cannot be reached ({_first_line(err)}); "
            "download it once online, or use a local file"
        ) from None
    except Exception as err:  # datasets raises many types (DatasetNotFoundError, ValueError, ArrowInvalid ...)
        name = type(err).__name__
        empty = re.search(r'Instruction "([^"]+)" corresponds to no data', str(err))
        if empty:  # load_dataset refuses a split without rows
            raise UserError(f"{label}, split {empty.group(1)}: no examples") from None
        if name == "DatasetNotFoundError":
            raise UserError(
                f"{data}: no such file or folder, and no Hub dataset of that name "
                f"({_first_line(err)}; a private or gated one needs `hf auth login`)"
            ) from None
        if data_config and "config" in str(err).lower():
            raise UserError(f"{label}: no configuration {data_config!r} ({_first_line(err)})") from None
        raise UserError(f"{label}: cannot read it ({name}: {_first_line(err)})") from None
    if isinstance(loaded, datasets.Dataset):  # a saved single Dataset: the train split
        return {"train": loaded}
    return dict(loaded)


def _choose_splits(found: dict, data_splits: Optional[str], label: str, datasets) -> Dict[str, tuple]:
    """{our split: (dataset split spec, datasets.Dataset)}, by --data-splits or by the usual names."""
    names = ", ".join(found) or "none"
    chosen: Dict[str, tuple] = {}
    if data_splits:
        for spec, ours in parse_pairs(data_splits, "--data-splits", "train_sft=train,test_sft=valid").items():
            if ours not in OUR_SPLITS:
                raise UserError(f"--data-splits: {spec}={ours}: the split to fill must be train, valid or test")
            if re.split(r"[\[+]", spec, maxsplit=1)[0].strip() not in found:
                raise UserError(f"{label}: no split {spec!r} (splits: {names})")
            try:  # "train[:90%]" and the like, as in load_dataset(split=...)
                parts = datasets.ReadInstruction.from_spec(spec).to_absolute({k: len(v) for k, v in found.items()})
            except (ValueError, AssertionError, KeyError) as err:
                raise UserError(f"{label}: --data-splits {spec!r}: {_first_line(err)} (splits: {names})") from None
            pieces = [found[p.splitname].select(range(p.from_, p.to)) for p in parts]
            chosen[ours] = (spec, pieces[0] if len(pieces) == 1 else datasets.concatenate_datasets(pieces))
    else:
        for theirs, ours in SPLIT_NAMES.items():
            if theirs in found and ours not in chosen:
                chosen[ours] = (theirs, found[theirs])
    if "train" not in chosen:
        raise UserError(
            f"{label}: no train split (splits: {names}); choose them with --data-splits, "
            f"e.g. --data-splits train_sft=train,test_sft=valid"
        )
    return {ours: chosen[ours] for ours in OUR_SPLITS if ours in chosen}


def _drop_nones(value):
    """Arrow gives every message of a column the union of their keys, None where a message had none
    (tool_calls on a user turn): drop those keys so each message is what was written."""
    if isinstance(value, list):
        return [{k: v for k, v in item.items() if v is not None} if isinstance(item, dict) else item for item in value]
    return value


def _rows(dataset, spec: str, mapping: Dict[str, str], label: str, prompts: bool = False) -> List[dict]:
    """The split's rows, renamed by ``mapping`` and each checked by data.detect_format."""
    from gmt_mlx.data.formats import check_mapped_columns, detect_format

    where_split = f"{label}, split {spec}"
    columns = list(dataset.column_names)
    for source in mapping:
        if source not in columns:
            raise UserError(f"{where_split}: no column {source!r} (named in --columns; columns: {', '.join(columns)})")
    for source, target in mapping.items():
        if target in columns and target not in mapping:
            raise UserError(
                f"{where_split}: --columns maps {source!r} to {target!r}, "
                f"but the dataset has a column {target!r} already"
            )
    renamed = [mapping.get(c, c) for c in columns]
    if not any(c in FORMAT_COLUMNS for c in renamed):
        raise UserError(
            f"{where_split}: no column of a known format (messages | prompt+completion | text | "
            f"prompt+chosen+rejected); columns: {', '.join(columns)}; map yours with --columns, "
            f"e.g. {_EXAMPLE_MAPPING}"
        )
    if len(dataset) == 0:
        raise UserError(f"{where_split}: no examples")
    # A renamed column is named by its own name too in messages: that is what the user sees.
    notes = {f"'{target}'": f"'{target}' (column '{source}')" for source, target in mapping.items()}
    rows: List[dict] = []
    first: Optional[str] = None
    for i, raw in enumerate(dataset.to_list()):
        row = {mapping.get(k, k): _drop_nones(v) for k, v in raw.items()}
        where = f"{where_split}, row {i}"
        try:
            fmt = detect_format(row, where, prompts)
        except UserError as err:
            message = str(err)
            for plain, noted in notes.items():
                message = message.replace(plain, noted)
            raise UserError(message) from None
        if first is None:
            first = fmt
            check_mapped_columns(mapping, fmt, where_split)
        elif fmt != first:
            raise UserError(
                f"{where}: format is {fmt} but the split started as {first} (row 0); one split must use one format"
            )
        rows.append(row)
    return rows


def load_source(
    data: str,
    columns: Optional[str] = None,
    data_config: Optional[str] = None,
    data_splits: Optional[str] = None,
    prompts: bool = False,
) -> Dict[str, List[dict]]:
    """Read ``data`` (file, saved folder or Hub id) into {split: rows}, like data.load_splits.

    ``columns``: 'question=prompt,answer=completion' renames dataset columns to our fields
    (the others are kept). ``data_config``: the Hub dataset's configuration (load_dataset's
    name). ``data_splits``: 'train_sft=train,test_sft=valid' or 'train[:90%]=train,train[90%:]=valid'
    picks the dataset splits (slices as in load_dataset) that become train / valid / test;
    by default train, validation (or valid, dev) and test. A single file is the train split.
    ``prompts``: prompt rows without a completion are accepted (`formats.detect_format`).
    """
    mapping = parse_pairs(columns, "--columns", "question=prompt,answer=completion")
    parse_pairs(data_splits, "--data-splits", "train_sft=train,test_sft=valid")  # syntax, before the import
    datasets = _import_datasets(str(data))
    label = f"dataset {data}"
    found = _load(str(data), data_config, datasets)
    return {
        ours: _rows(ds, spec, mapping, label, prompts)
        for ours, (spec, ds) in _choose_splits(found, data_splits, label, datasets).items()
    }


def column_warnings(
    data: str | Path,
    splits: Dict[str, List[dict]],
    columns: Optional[str] = None,
    *,
    data_config: Optional[str] = None,
    data_splits: Optional[str] = None,
    prompts: bool = False,
) -> List[str]:
    """One warning per file (or dataset split) of ``load_splits``' rows whose columns no format reads, with counts."""
    from gmt_mlx.data.formats import detect_format, unused_warning

    path = Path(data).expanduser()
    lines = []
    for name, rows in splits.items():
        if not rows:
            continue
        if wants_datasets(str(data), columns, data_config, data_splits):
            where = f"dataset {data}, split {name}"
        else:
            where = str(path if path.is_file() else path / f"{name}.jsonl")
        line = unused_warning(where, rows, detect_format(rows[0], where, prompts))
        if line:
            lines.append(line)
    return lines


def load_splits(
    data: str | Path,
    columns: str | None = None,
    *,
    data_config: str | None = None,
    data_splits: str | None = None,
    prompts: bool = False,
) -> dict[str, list[dict]]:
    """Load a data folder (train.jsonl required; valid/test.jsonl optional) or one JSONL file.

    Returns {split: rows} for the splits present; a single file becomes {"train": rows}.
    Parquet/CSV/JSON files, save_to_disk folders, Hub dataset ids, and any data with
    ``columns``/``data_config``/``data_splits`` go to load_source (the `datasets` extra).
    ``prompts`` (--train-mode grpo, eval --reward): prompt rows with no completion are accepted.
    """
    if wants_datasets(str(data), columns, data_config, data_splits):
        return load_source(str(data), columns, data_config, data_splits, prompts)
    mapping = parse_pairs(columns, "--columns", "question=prompt,answer=completion")
    path = Path(data).expanduser()
    if not path.exists():
        raise UserError(f"{path}: no such file or folder (expected a folder with train.jsonl, or a .jsonl file)")
    if path.is_file():
        return {"train": read_jsonl(path, prompts, mapping)}
    if (path / "train.jsonl").is_dir():
        raise UserError(f"{path / 'train.jsonl'}: is a directory, not a JSONL file")
    if not (path / "train.jsonl").is_file():
        raise UserError(
            f"{path}: no train.jsonl (a data folder needs train.jsonl; valid.jsonl and test.jsonl are optional)"
        )
    return {
        name: read_jsonl(path / f"{name}.jsonl", prompts, mapping)
        for name in SPLITS
        if (path / f"{name}.jsonl").is_file()
    }

"""Row formats: read JSONL files and check that each row is one of the formats we train on.

Data lives in JSONL files, one example per line, in the formats that
`mlx_lm.lora` users know:

- chat:        {"messages": [{"role": "user", "content": ...}, ...]}
- completions: {"prompt": ..., "completion": ...}
- text:        {"text": ...}
- preference:  {"prompt": ..., "chosen": ..., "rejected": ...}  (TRL's conventions;
               --train-mode dpo / orpo; strings, or message lists; optional "system")
- prompts:     {"prompt": ..., "answer": ...}, no completion (--train-mode grpo and eval
               --reward only, ``prompts=True``: the completions are sampled; chat rows
               whose last turn is the user's are prompts too, in any mode)

A data folder holds `train.jsonl` (required), `valid.jsonl` and `test.jsonl`
(optional). Every problem with a file becomes a one-line `UserError` that
names the file and the 1-based line.
"""

from __future__ import annotations

import codecs
import json
import sys
import unicodedata
from pathlib import Path

from gmt_mlx.errors import UserError

FORMATS = ("chat", "completions", "text", "preference", "prompts")
SPLITS = ("train", "valid", "test")
_KNOWN = "messages | prompt+completion | text | prompt+chosen+rejected"
# The columns each format's rows are read by (data.encoding; "tools" beside messages or prompt/completion).
# Prompt rows are not listed: their every column goes to the rewards (a --reward module:function reads any).
READ_COLUMNS = {
    "chat": ("messages", "tools"),
    "completions": ("prompt", "completion", "tools"),
    "text": ("text",),
    "preference": ("prompt", "chosen", "rejected", "system"),
}
# Columns eval's scorers read from any row (scorers.reference_of: answer; reasoning_gym: question, metadata).
SCORER_COLUMNS = ("answer", "question", "metadata")


# --------------------------------------------------------------------------
# Reading and validating JSONL
# --------------------------------------------------------------------------


def _check_messages(messages: object, where: str) -> None:
    """Raise a UserError unless `messages` is a usable chat transcript."""
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if isinstance(messages, list) else type(messages).__name__
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects, got {got}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise UserError(
                f"{where}: messages[{i}] must be an object with 'role' and 'content', got {type(message).__name__}"
            )
        if not isinstance(message.get("role"), str):
            raise UserError(f"{where}: messages[{i}] has no string 'role'")
        _check_role(message["role"], f"{where}: messages[{i}]")
        content = message.get("content")
        # Tool-call turns may carry no content; list content is the HF "parts" form the template renders.
        if content is None and "tool_calls" in message:
            continue
        if not isinstance(content, (str, list)):
            got = "missing" if "content" not in message else type(content).__name__
            raise UserError(f"{where}: messages[{i}] 'content' must be a string, got {got}")
        if isinstance(content, list):
            _check_parts(content, f"{where}: messages[{i}] 'content'")


def _check_role(role: str, where: str) -> None:
    """Refuse a role holding invisible or surrounding characters ("user\u200b", "user "): a template reads it as
    another role, and the turn silently loses its place (its masking, its special tokens)."""
    hidden = [ch for ch in role if not ch.isprintable() or unicodedata.category(ch) == "Cf"]
    if hidden or role != role.strip():
        what = f"an invisible character (U+{ord(hidden[0]):04X})" if hidden else "spaces around it"
        clean = "".join(ch for ch in role if ch not in hidden).strip()
        raise UserError(
            f"{where} has role {role!r}, which holds {what}" + (f"; did you mean {clean!r}?" if clean else "")
        )


def _check_parts(content: list, where: str) -> None:
    """Refuse a list content that is not the parts form ([{"type": "text", "text": ...}, ...]) a template renders."""
    for j, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            got = type(part).__name__ if not isinstance(part, dict) else "an object without a string 'type'"
            raise UserError(
                f"{where} is a list whose item {j} is {got}; a list content holds parts like "
                f'{{"type": "text", "text": "..."}} (or write the content as a string)'
            )
        if part["type"] == "text" and not isinstance(part.get("text"), str):
            raise UserError(f"{where}: item {j} is a text part without a string 'text'")


def _answer_text(answer: object) -> str:
    """The text of an answer (a string, or the contents of a message list), to tell empty and equal ones."""
    if isinstance(answer, str):
        return answer
    return "\n".join(m["content"] for m in answer if isinstance(m.get("content"), str))


def _check_preference(example: dict, where: str) -> None:
    """Raise a UserError unless `example` is a usable prompt/chosen/rejected row."""
    for key in ("prompt", "chosen", "rejected"):
        if key not in example:
            raise UserError(
                f"{where}: has {' and '.join(repr(k) for k in ('chosen', 'rejected') if k in example)} "
                f"but no '{key}' (the preference format needs prompt, chosen and rejected)"
            )
    prompt = example["prompt"]
    if isinstance(prompt, list):
        _check_messages(prompt, f"{where}: 'prompt'")
    elif not isinstance(prompt, str):
        raise UserError(f"{where}: 'prompt' must be a string or a list of messages, got {type(prompt).__name__}")
    if not _answer_text(prompt).strip():
        raise UserError(f"{where}: 'prompt' is empty (the answers are preferred as replies to it)")
    for key in ("chosen", "rejected"):
        answer = example[key]
        if isinstance(answer, list):
            _check_messages(answer, f"{where}: '{key}'")
            turns = [n for n, m in enumerate(answer) if m["role"] in ("user", "system")]
            if turns:
                raise UserError(
                    f"{where}: '{key}' holds a {answer[turns[0]]['role']} turn (messages[{turns[0]}]); "
                    f"an answer is the assistant's reply: the question belongs in 'prompt'"
                )
        elif not isinstance(answer, str):
            raise UserError(f"{where}: '{key}' must be a string or a list of messages, got {type(answer).__name__}")
        if not _answer_text(answer).strip():
            raise UserError(f"{where}: '{key}' is empty (a preference pair needs two answers)")
    if _answer_text(example["chosen"]) == _answer_text(example["rejected"]):
        raise UserError(f"{where}: 'chosen' and 'rejected' are the same answer (nothing to prefer)")
    if "system" in example and not isinstance(example["system"], str):
        raise UserError(f"{where}: 'system' must be a string, got {type(example['system']).__name__}")


def is_preference_row(row: object) -> bool:
    """Whether ``row`` is a preference row (it has "chosen" or "rejected"): the one test, for files and splits."""
    return isinstance(row, dict) and ("chosen" in row or "rejected" in row)


def detect_format(example: dict, where: str, prompts: bool = False) -> str:
    """Return 'chat', 'completions', 'text' or 'preference' for one example, or raise UserError naming `where`.

    `where` is the location used in messages, normally "file:line". ``prompts``
    (GRPO, reward evaluation): a "prompt" with no "completion" is a 'prompts' row.
    """
    if not isinstance(example, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(example).__name__}")
    if is_preference_row(example):
        _check_preference(example, where)
        return "preference"
    if "messages" in example:
        _check_messages(example["messages"], where)
        return "chat"
    if prompts and "prompt" in example and "completion" not in example:
        if not isinstance(example["prompt"], (str, list)):
            raise UserError(
                f"{where}: 'prompt' must be a string or a list of messages, got {type(example['prompt']).__name__}"
            )
        if isinstance(example["prompt"], list):
            _check_messages(example["prompt"], f"{where}: 'prompt'")
        if not _answer_text(example["prompt"]).strip():
            raise UserError(f"{where}: 'prompt' is empty (nothing to answer)")
        return "prompts"
    if "prompt" in example or "completion" in example:
        for key in ("prompt", "completion"):
            if key not in example:
                other = "completion" if key == "prompt" else "prompt"
                hint = "; prompt-only rows are for --train-mode grpo" if key == "completion" else ""
                raise UserError(f"{where}: has '{other}' but no '{key}' (completions format needs both{hint})")
            if not isinstance(example[key], str):
                raise UserError(f"{where}: '{key}' must be a string, got {type(example[key]).__name__}")
        return "completions"
    if "text" in example:
        if not isinstance(example["text"], str):
            raise UserError(f"{where}: 'text' must be a string, got {type(example['text']).__name__}")
        return "text"
    # repr() for odd keys keeps the message one printable line (newlines, lone surrogates).
    keys = ", ".join(k if k.isprintable() else repr(k) for k in sorted(example)) or "none"
    raise UserError(
        f"{where}: line has none of the known formats ({_KNOWN}); keys found: {keys}; "
        "map yours with --columns, e.g. --columns question=prompt,answer=completion"
    )


def _parse_line(line: str, where: str) -> object:
    """json.loads, with every way it can fail turned into a UserError naming `where`."""
    try:
        row = json.loads(line)
        if "\\u" in line:  # only an escape can put a lone UTF-16 surrogate in the text
            json.dumps(row, ensure_ascii=False).encode("utf-8")
        return row
    except UnicodeEncodeError as err:
        bad = err.object[err.start : err.end].encode("unicode_escape").decode("ascii")
        raise UserError(
            f"{where}: the text holds a lone UTF-16 surrogate ({bad}, half of a pair): not a character; "
            "remove it or write the whole pair"
        ) from None
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: invalid JSON ({err.msg}, column {err.colno})") from None
    except RecursionError:
        # Python's parser recurses per nesting level (~1000 levels max).
        raise UserError(f"{where}: invalid JSON (nested too deeply)") from None
    except ValueError as err:
        # Python 3.11+ refuses integer literals over 4,300 digits (sys.int_max_str_digits).
        if "digits" in str(err):
            raise UserError(
                f"{where}: invalid JSON (an integer literal of more than {sys.get_int_max_str_digits()} digits)"
            ) from None
        raise UserError(f"{where}: invalid JSON ({str(err).splitlines()[0][:120]})") from None


def unused_columns(rows: list, fmt: str) -> dict[str, int]:
    """{column: rows holding it} of the columns that no part of training or eval reads in ``fmt`` rows
    (Alpaca's `input` after --columns instruction=prompt,output=completion); {} for prompt rows."""
    if fmt not in READ_COLUMNS:
        return {}
    read = set(READ_COLUMNS[fmt]) | set(SCORER_COLUMNS)
    counts: dict[str, int] = {}
    for row in rows:
        for key in row:
            if key not in read:
                counts[key] = counts.get(key, 0) + 1
    return counts


def unused_warning(where: str, rows: list, fmt: str) -> str | None:
    """One warning line for a file (or split) whose rows hold unread columns, with their counts; None if none."""
    counts = unused_columns(rows, fmt)
    if not counts:
        return None
    listed = ", ".join(f"{k if k.isprintable() else repr(k)} ({n} of {len(rows)} rows)" for k, n in counts.items())
    into = {
        "chat": "the messages",
        "completions": "the prompt or completion",
        "text": "the text",
        "preference": "the prompt",
    }[fmt]
    return (
        f"warning: {where}: {fmt} rows do not read these columns, which are ignored: {listed}; "
        f"to train on them, fold them into {into}"
    )


def check_mapped_columns(mapping: dict, fmt: str, where: str) -> None:
    """A --columns target that ``fmt`` rows never read is a mistake: the user named the column to be used."""
    if fmt not in READ_COLUMNS:
        return
    for source, target in mapping.items():
        if target not in READ_COLUMNS[fmt] and target not in SCORER_COLUMNS:
            raise UserError(
                f"{where}: --columns maps {source!r} to {target!r}, which {fmt} rows do not read "
                f"(they read {', '.join(READ_COLUMNS[fmt])}); map it to one of those, or leave it out"
            )


def rename_columns(row: object, mapping: dict, where: str) -> object:
    """``row`` with its keys renamed by --columns ``mapping``; a row holding both a source and its target is refused."""
    if not mapping or not isinstance(row, dict):
        return row
    for source, target in mapping.items():
        if source in row and target in row and target not in mapping:
            raise UserError(f"{where}: --columns maps {source!r} to {target!r}, but the line has a {target!r} already")
    return {mapping.get(k, k): v for k, v in row.items()}


def _noted(err: UserError, mapping: dict) -> UserError:
    """``err`` naming each renamed field by its column too ('prompt' (column 'question')): what the user wrote."""
    message = str(err)
    for source, target in mapping.items():
        message = message.replace(f"'{target}'", f"'{target}' (column '{source}')")
    return UserError(message)


def read_jsonl(path: Path, prompts: bool = False, columns: dict | None = None) -> list[dict]:
    """Read a JSONL file of examples, validating every line; blank lines are skipped.

    Lines end at \n (or \r\n) only: U+2028, U+2029 and U+0085 are valid inside
    JSON strings. A leading UTF-8 byte-order mark is skipped. Raises UserError
    ("file:line: ...") for invalid JSON, a line that is not an object, an unknown
    format, or a format that differs from the file's first example; and
    ("file: no examples") for a file without any. ``prompts``: see `detect_format`.
    ``columns``: {source: field} renames each row's keys first (--columns, without the `datasets` extra).
    """
    columns = columns or {}
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a JSONL file")
    try:
        raw = path.read_bytes()
        # Editors on Windows write a BOM; it is not part of the first line's JSON.
        text = raw[len(codecs.BOM_UTF8) :].decode("utf-8") if raw.startswith(codecs.BOM_UTF8) else raw.decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise UserError(f"{path}:{line}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None

    rows: list[dict] = []
    first: tuple[str, int] | None = None  # (format, line) of the first example
    file_columns: dict = {}  # every key of the file's rows, in order (a dict as an ordered set), for --columns
    # Not str.splitlines(): it also splits at U+2028/U+2029/U+0085 and other controls.
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        raw = _parse_line(line, where)
        if columns and isinstance(raw, dict):
            file_columns.update(dict.fromkeys(raw))
        row = rename_columns(raw, columns, where)
        fmt = _detect_renamed(row, where, prompts, path, columns, file_columns)
        if first is None:
            first = (fmt, lineno)
            check_mapped_columns(columns, fmt, where)
        elif fmt != first[0]:
            # One file, one format: mixing usually means a broken export, and the
            # prompt-masking rules differ per format.
            raise UserError(
                f"{where}: format is {fmt} but the file started as {first[0]} (line {first[1]}); "
                "one file must use one format"
            )
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: no examples")
    _check_sources(path, columns, file_columns)
    return rows


def _detect_renamed(row: object, where: str, prompts: bool, path: Path, columns: dict, seen: dict) -> str:
    """`detect_format` of a row renamed by --columns, its errors naming the file's own columns."""
    try:
        return detect_format(row, where, prompts)
    except UserError as err:
        if not columns:
            raise
        _check_sources(path, columns, seen)  # a misspelt source explains the row better
        raise _noted(err, columns) from None


def _check_sources(path: Path, columns: dict, seen: dict) -> None:
    """Refuse a --columns source that none of the rows read so far holds."""
    for source in columns:
        if source not in seen:
            listed = ", ".join(k if k.isprintable() else repr(k) for k in seen)
            raise UserError(f"{path}: no column {source!r} (named in --columns; columns: {listed})")

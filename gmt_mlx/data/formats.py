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
            raise UserError(f"{where}: messages[{i}] must be an object with 'role' and 'content', got {type(message).__name__}")
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
        raise UserError(f"{where} has role {role!r}, which holds {what}" + (f"; did you mean {clean!r}?" if clean
                                                                             else ""))


def _check_parts(content: list, where: str) -> None:
    """Refuse a list content that is not the parts form ([{"type": "text", "text": ...}, ...]) a template renders."""
    for j, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            got = type(part).__name__ if not isinstance(part, dict) else "an object without a string 'type'"
            raise UserError(f"{where} is a list whose item {j} is {got}; a list content holds parts like "
                            f"{{\"type\": \"text\", \"text\": \"...\"}} (or write the content as a string)")
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
            raise UserError(f"{where}: has {' and '.join(repr(k) for k in ('chosen', 'rejected') if k in example)} "
                            f"but no '{key}' (the preference format needs prompt, chosen and rejected)")
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
                raise UserError(f"{where}: '{key}' holds a {answer[turns[0]]['role']} turn (messages[{turns[0]}]); "
                                f"an answer is the assistant's reply: the question belongs in 'prompt'")
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
            raise UserError(f"{where}: 'prompt' must be a string or a list of messages, got {type(example['prompt']).__name__}")
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
    raise UserError(f"{where}: line has none of the known formats ({_KNOWN}); keys found: {keys}")


def _parse_line(line: str, where: str) -> object:
    """json.loads, with every way it can fail turned into a UserError naming `where`."""
    try:
        row = json.loads(line)
        if "\\u" in line:  # only an escape can put a lone UTF-16 surrogate in the text
            json.dumps(row, ensure_ascii=False).encode("utf-8")
        return row
    except UnicodeEncodeError as err:
        bad = err.object[err.start:err.end].encode("unicode_escape").decode("ascii")
        raise UserError(f"{where}: the text holds a lone UTF-16 surrogate ({bad}, half of a pair): not a character; "
                        "remove it or write the whole pair") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: invalid JSON ({err.msg}, column {err.colno})") from None
    except RecursionError:
        # Python's parser recurses per nesting level (~1000 levels max).
        raise UserError(f"{where}: invalid JSON (nested too deeply)") from None
    except ValueError as err:
        # Python 3.11+ refuses integer literals over 4,300 digits (sys.int_max_str_digits).
        if "digits" in str(err):
            raise UserError(f"{where}: invalid JSON (an integer literal of more than "
                            f"{sys.get_int_max_str_digits()} digits)") from None
        raise UserError(f"{where}: invalid JSON ({str(err).splitlines()[0][:120]})") from None


def read_jsonl(path: Path, prompts: bool = False) -> list[dict]:
    """Read a JSONL file of examples, validating every line; blank lines are skipped.

    Lines end at \n (or \r\n) only: U+2028, U+2029 and U+0085 are valid inside
    JSON strings. A leading UTF-8 byte-order mark is skipped. Raises UserError
    ("file:line: ...") for invalid JSON, a line that is not an object, an unknown
    format, or a format that differs from the file's first example; and
    ("file: no examples") for a file without any. ``prompts``: see `detect_format`.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a JSONL file")
    try:
        raw = path.read_bytes()
        # Editors on Windows write a BOM; it is not part of the first line's JSON.
        text = raw[len(codecs.BOM_UTF8):].decode("utf-8") if raw.startswith(codecs.BOM_UTF8) else raw.decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise UserError(f"{path}:{line}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None

    rows: list[dict] = []
    first: tuple[str, int] | None = None  # (format, line) of the first example
    # Not str.splitlines(): it also splits at U+2028/U+2029/U+0085 and other controls.
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        row = _parse_line(line, where)
        fmt = detect_format(row, where, prompts)
        if first is None:
            first = (fmt, lineno)
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
    return rows


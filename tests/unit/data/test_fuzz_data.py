"""Fuzz the JSONL loader: mutated copies of the shipped example files either load or fail
with a one-line UserError at ``file:line`` (or ``file: no examples``), never a traceback.

The campaign is in-process and seeded: each run tries the same mutations. Causes it
found (issue 14) each have a regression test in test_data.py.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from gmt_mlx.data.formats import read_jsonl
from gmt_mlx.errors import UserError

EXAMPLES = sorted((Path(__file__).resolve().parents[3] / "examples" / "data").glob("*/train.jsonl"))
MUTATIONS_PER_FILE = 800

# Things that once broke (or could break) a line-based JSON reader.
INSERTS = [
    b"[" * 3000,
    b'{"a":' * 2000,
    b"9" * 5000,
    b"-" + b"1" * 4400,
    b"1e99999",
    b"NaN",
    b"\x00",
    b"\x0b",
    b"\x1c",
    b"\r",
    b"\r\n",
    b"\n",
    b"\xef\xbb\xbf",
    "\u2028".encode(),
    "\u2029".encode(),
    "\u0085".encode(),
    b"\xff",
    b"\xc3",
    b"\\",
    b"\\ud800",
    b'"',
    b"{",
    b"}",
    b"[]",
    b"null",
    b",",
    b":",
    b'"messages": 3',
    b'"prompt": [1]',
    b'"text": {}',
    b'"role": null',
    b'"content": 7',
]


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to three random edits: flips, truncations, insertions, deletions, duplications."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(7)
        pos = rng.randrange(len(buf) + 1)
        if kind == 0 and buf:  # flip one bit
            i = min(pos, len(buf) - 1)
            buf[i] ^= 1 << rng.randrange(8)
        elif kind == 1:  # truncate
            del buf[pos:]
        elif kind == 2:  # insert a nasty token
            buf[pos:pos] = rng.choice(INSERTS)
        elif kind == 3:  # delete a quote, brace or bracket
            hits = [i for i, b in enumerate(buf) if b in b'"{}[]:,']
            if hits:
                del buf[rng.choice(hits)]
        elif kind == 4:  # random bytes
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif kind == 5 and buf:  # replace a byte with a control or high byte
            buf[min(pos, len(buf) - 1)] = rng.choice([0, 9, 10, 11, 12, 13, 28, 133, 0xC2, 0xE2, 0xFE])
        else:  # duplicate a slice (a second format, a half line)
            end = min(len(buf), pos + rng.randint(1, 200))
            buf[pos:pos] = buf[pos:end]
    return bytes(buf)


def _outcome(path: Path) -> str:
    try:
        read_jsonl(path)
    except UserError as err:
        message = str(err)
        name = re.escape(str(path))
        assert re.match(rf"{name}(:\d+: |: no examples$)", message), message
        assert "\n" not in message and "\r" not in message, repr(message)
        message.encode("utf-8")  # printable on a UTF-8 terminal (no lone surrogates)
        return "error"
    return "loaded"


@pytest.mark.slow
def test_fuzzed_example_files_never_crash_the_loader(tmp_path):
    assert EXAMPLES, "no examples/data/*/train.jsonl to mutate"
    rng = random.Random(20261128)
    counts = {"loaded": 0, "error": 0}
    path = tmp_path / "train.jsonl"
    for source in EXAMPLES:
        # A slice of each file keeps a mutation cheap; whole files are parsed by test_data.py.
        lines = source.read_bytes().splitlines(keepends=True)
        original = b"".join(lines[:12])
        for _ in range(MUTATIONS_PER_FILE):
            path.write_bytes(mutate(original, rng))
            counts[_outcome(path)] += 1  # any other exception fails the test with its traceback
    assert counts["loaded"] > 0 and counts["error"] > 0, counts

"""The tokenizer both ways: GGUF vocabulary metadata <-> a Hugging Face `tokenizers` tokenizer.

`build_tokenizer` rebuilds tokenizer.json and tokenizer_config.json from a
GGUF's `tokenizer.*` metadata (the import: byte-level BPE with llama.cpp's
pre-tokenizer, or a SentencePiece vocabulary as byte-fallback BPE);
`tokenizer_metadata` writes those keys from a byte-level BPE tokenizer.json
(the export). Together because each is the other's inverse: one module keeps
llama.cpp's token types and pre-tokenizer names in step.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, Optional

from gmt_mlx.errors import UserError
from gmt_mlx.models.gguf.tables import (
    DIGITS_THEN_GPT2,
    GPT2_STYLE,
    LLAMA3_PATTERN,
    LLAMA3_STYLE,
    QWEN2_PATTERN,
    QWEN2_STYLE,
)

# llama.cpp token types (llama.h: LLAMA_TOKEN_TYPE_*).
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED, _TOKEN_BYTE = 1, 2, 3, 4, 5, 6


# ---------------------------------------------------------------- GGUF -> tokenizers (the import)


def _bpe_pre_tokenizer(pre: str):
    """The Hugging Face pre-tokenizer matching llama.cpp's `tokenizer.ggml.pre`."""
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in LLAMA3_STYLE or pre in QWEN2_STYLE:
        pattern = LLAMA3_PATTERN if pre in LLAMA3_STYLE else QWEN2_PATTERN
        split = pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False)
        return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre not in GPT2_STYLE:
        warnings.warn(
            f"GGUF pre-tokenizer {pre!r} is not known to gmt-mlx; using GPT-2's split rules, "
            "so some texts may tokenize differently than in llama.cpp",
            stacklevel=4,  # the caller of build_tokenizer (via _bpe_tokenizer)
        )
    return byte_level


def _spm_merges(tokens: list[str], scores: list[float], vocab: dict[str, int], normal: set[int]):
    """BPE merges implied by a SentencePiece vocabulary: a piece's score ranks its merge."""
    ranked = []
    for i in sorted(normal):
        piece = tokens[i]
        local = [
            (piece[:k], piece[k:])
            for k in range(1, len(piece))
            if vocab.get(piece[:k]) in normal and vocab.get(piece[k:]) in normal
        ]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        ranked.extend((scores[i], lr) for lr in local)
    ranked.sort(key=lambda item: -item[0])  # stable: ties keep vocabulary order
    return [lr for _, lr in ranked]


def build_tokenizer(metadata: dict):
    """A `tokenizers.Tokenizer` and its tokenizer_config.json dict from GGUF metadata."""
    kind = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise UserError("GGUF has no tokenizer (tokenizer.ggml.model / tokens metadata missing)")
    types = metadata.get("tokenizer.ggml.token_type") or [_TOKEN_NORMAL] * len(tokens)
    vocab = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)  # a duplicated string keeps its first id, like llama.cpp

    def token(key):
        idx = metadata.get(f"tokenizer.ggml.{key}")
        return tokens[idx] if idx is not None and 0 <= idx < len(tokens) else None

    bos, eos = token("bos_token_id"), token("eos_token_id")
    unk, pad = token("unknown_token_id"), token("padding_token_id")
    if kind == "gpt2":
        tok, add_bos_default = _bpe_tokenizer(metadata, vocab), False
    elif kind == "llama":
        tok, add_bos_default = _spm_tokenizer(metadata, tokens, types, vocab, unk), True
    else:
        raise UserError(f"unsupported GGUF tokenizer model {kind!r} (supported: gpt2, llama)")
    _add_special_tokens(tok, tokens, types)

    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos_default)) and bos is not None
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        tok.post_processor = _bos_eos_template(vocab, bos if add_bos else None, eos if add_eos else None)
    config = _tokenizer_config(metadata, bos=bos, eos=eos, pad=pad, unk=unk, add_bos=add_bos, add_eos=add_eos)
    return tok, config


def _bpe_tokenizer(metadata: dict, vocab: dict[str, int]):
    """A byte-level BPE tokenizer (`tokenizer.ggml.model` gpt2) with llama.cpp's pre-tokenizer."""
    from tokenizers import Tokenizer, decoders, models, processors

    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges") or []]
    pre = metadata.get("tokenizer.ggml.pre", "default")
    tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=pre in LLAMA3_STYLE))
    tok.pre_tokenizer = _bpe_pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # unless a BOS/EOS template replaces it
    return tok


def _spm_tokenizer(metadata: dict, tokens: list[str], types: list[int], vocab: dict[str, int], unk: str | None):
    """A SentencePiece vocabulary (`tokenizer.ggml.model` llama) as byte-fallback BPE, merges ranked by score."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    normal = {i for i, t in enumerate(types) if t in (_TOKEN_NORMAL, _TOKEN_USER_DEFINED)}
    merges = _spm_merges(tokens, scores, vocab, normal)
    tok = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Prepend("▁")] if space_prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    strip = [decoders.Strip(" ", 1, 0)] if space_prefix else []  # the prepended space
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()] + strip)
    return tok


def _add_special_tokens(tok, tokens: list[str], types: list[int]) -> None:
    """Add the control and user-defined tokens to `tok`, as llama.cpp treats them.

    Control tokens (and SPM's <unk>) are special; user-defined ones are matched
    in raw text but decoded like normal text.
    """
    from tokenizers import AddedToken

    special_types = (_TOKEN_CONTROL, _TOKEN_UNKNOWN)
    specials = [tokens[i] for i, t in enumerate(types) if t in special_types]
    user = [tokens[i] for i, t in enumerate(types) if t == _TOKEN_USER_DEFINED]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if user:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])


def _bos_eos_template(vocab: dict[str, int], bos: str | None, eos: str | None):
    """The post-processor that puts `bos` before and `eos` after each sequence (None: that one is not added)."""
    from tokenizers import processors

    head, tail = (f"{bos}:0 " if bos is not None else ""), (f" {eos}:0" if eos is not None else "")
    used = [(t, vocab[t]) for t in (bos, eos) if t is not None]
    return processors.TemplateProcessing(
        single=f"{head}$A:0{tail}",
        pair=f"{head}$A:0{tail} {head.replace(':0', ':1')}$B:1{tail.replace(':0', ':1')}",
        special_tokens=list(dict.fromkeys(used)),
    )


def _tokenizer_config(
    metadata: dict, *, bos: str | None, eos: str | None, pad: str | None, unk: str | None, add_bos: bool, add_eos: bool
) -> dict:
    """tokenizer_config.json: the special tokens, whether BOS/EOS are added, the context length, the chat template."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "unk_token": unk,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(metadata.get(f"{metadata.get('general.architecture', 'llama')}.context_length", 2048)),
    }
    if metadata.get("tokenizer.chat_template"):
        config["chat_template"] = metadata["tokenizer.chat_template"]
    return config


# ---------------------------------------------------------------- tokenizer.json -> GGUF (the export)


def _token_text(value) -> Optional[str]:
    return value.get("content") if isinstance(value, dict) else value


def _pre_tokenizer_name(pre: Optional[Dict[str, Any]], normalizer: Optional[Dict[str, Any]]) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE tokenizer.json, judged by its split rules."""

    def byte_level(step, regex):
        return step.get("type") == "ByteLevel" and bool(step.get("use_regex", True)) == regex

    steps = [] if pre is None else pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and byte_level(steps[0], True):
        name = "gpt-2"
    elif (
        len(steps) == 2
        and steps[0].get("type") == "Digits"
        and steps[0].get("individual_digits")
        and byte_level(steps[1], True)
    ):
        name = "smollm"  # llama.cpp splits digits then applies GPT-2's rules, as for starcoder
    elif len(steps) == 2 and steps[0].get("type") == "Split" and byte_level(steps[1], False):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        name = {LLAMA3_PATTERN: "llama-bpe", QWEN2_PATTERN: "qwen2"}.get(pattern)
        if name is None:
            raise UserError(
                f"GGUF export: the tokenizer's split regex {pattern!r} is not one llama.cpp "
                "knows (GPT-2, SmolLM, Llama 3, Qwen2)"
            )
    else:
        kinds = "+".join(s.get("type", "?") for s in steps) or "none"
        raise UserError(f"GGUF export: pre-tokenizer {kinds} has no llama.cpp equivalent known to gmt-mlx")
    if normalizer is not None and not (name == "qwen2" and normalizer.get("type") == "NFC"):
        raise UserError(
            f"GGUF export: a byte-level tokenizer with a {normalizer.get('type')} normalizer "
            "has no llama.cpp equivalent"
        )
    return name


def _adds_bos(tokenizer_json: Dict[str, Any], tokenizer_config: Dict[str, Any], bos: Optional[str]) -> bool:
    if "add_bos_token" in tokenizer_config:  # transformers < 5 writes it
        return bool(tokenizer_config["add_bos_token"]) and bos is not None
    post = tokenizer_json.get("post_processor") or {}
    steps = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for step in steps:
        if step.get("type") == "TemplateProcessing" and step.get("single"):
            first = step["single"][0]
            return "SpecialToken" in first and first["SpecialToken"]["id"] == bos
    return False


def tokenizer_metadata(
    tokenizer_json: Dict[str, Any],
    tokenizer_config: Dict[str, Any],
    config: Dict[str, Any],
    n_vocab: int,
    chat_template: Optional[str] = None,
) -> Dict[str, Any]:
    """`tokenizer.*` keys for a byte-level BPE tokenizer (what llama.cpp's converter writes)."""
    model = tokenizer_json.get("model") or {}
    decoder = tokenizer_json.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise UserError(
            "GGUF export supports byte-level BPE tokenizers (GPT-2 style: SmolLM2, Llama 3, "
            f"Qwen2); this one is {model.get('type')} with a {decoder.get('type')} decoder"
        )
    pre = _pre_tokenizer_name(tokenizer_json.get("pre_tokenizer"), tokenizer_json.get("normalizer"))
    ids = dict(model["vocab"])
    added = {t["content"]: t for t in tokenizer_json.get("added_tokens") or []}
    ids.update({content: t["id"] for content, t in added.items()})
    if max(ids.values()) >= n_vocab:
        raise UserError(f"GGUF export: token id {max(ids.values())} is beyond the {n_vocab} embedding rows")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]  # rows no token uses, as llama.cpp pads them
    types = [_TOKEN_UNUSED] * n_vocab
    for text, i in ids.items():
        tokens[i] = text
        types[i] = _TOKEN_NORMAL
    for text, t in added.items():
        types[t["id"]] = _TOKEN_CONTROL if t.get("special") else _TOKEN_USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]

    meta: Dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
    }
    names = {key: _token_text(tokenizer_config.get(f"{key}_token")) for key in ("bos", "eos", "unk", "pad")}
    for key, gguf_key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        token_id = ids.get(names[key]) if names[key] is not None else None
        if token_id is None and key != "unk":
            token_id = config.get(f"{key}_token_id") if not isinstance(config.get(f"{key}_token_id"), list) else None
        if token_id is not None:
            meta[f"tokenizer.ggml.{gguf_key}_token_id"] = int(token_id)
    # A second end-of-sequence id in config.json (e.g. <|endoftext|> and <|im_end|>) is llama.cpp's end-of-turn.
    eos_ids = config.get("eos_token_id")
    eos_ids = eos_ids if isinstance(eos_ids, list) else [eos_ids] if eos_ids is not None else []
    others = [i for i in eos_ids if i != meta.get("tokenizer.ggml.eos_token_id")]
    if others:
        meta.setdefault("tokenizer.ggml.eos_token_id", int(others.pop(0)))
    if others:
        meta["tokenizer.ggml.eot_token_id"] = int(others[0])
    meta["tokenizer.ggml.add_bos_token"] = _adds_bos(tokenizer_json, tokenizer_config, names["bos"])
    meta["tokenizer.ggml.add_eos_token"] = bool(tokenizer_config.get("add_eos_token", False))
    template = chat_template or tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: llama.cpp reads the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template:
        meta["tokenizer.chat_template"] = template
    return meta

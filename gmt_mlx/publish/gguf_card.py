"""The model card of a GGUF export (`gmt-mlx export --format gguf`): what card.py's card says differently.

The folder holds one .gguf per --outtype and an Ollama Modelfile, not safetensors, so the card's front
matter lists it under GGUF, its first paragraph names the files, and its usage is llama.cpp and Ollama.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def gguf_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """A GGUF export's front matter: the Hub lists the repo under GGUF (llama.cpp, Ollama, LM Studio)."""
    meta = {**meta, "library_name": "gguf"}
    meta["tags"] = list(dict.fromkeys([*meta.get("tags", []), "gguf"]))
    return meta


def gguf_intro(intro: str, files: Sequence[str]) -> str:
    """The first paragraph, saying that the folder holds .gguf files (``files``) rather than safetensors."""
    if not files:
        return intro
    listed = ", ".join(f"`{name}`" for name in files)
    what = (
        f"the merged weights as GGUF for llama.cpp, Ollama and LM Studio ({listed}; "
        "one file per quantization) and an Ollama `Modelfile`"
    )
    return re.sub(
        r"This repository holds .*?; exported from", lambda _: f"This repository holds {what}; exported from", intro
    )


def gguf_usage(files: Sequence[str], model_id: str) -> str:
    """llama.cpp and Ollama lines for each .gguf file of repo ``model_id`` (the Hub serves a file by its
    quantization tag)."""
    lines = []
    for name in files:
        quant = Path(name).stem.rsplit("-", 1)[-1].upper()
        lines += [f"llama-cli -hf {model_id}:{quant}", f"ollama run hf.co/{model_id}:{quant}"]
    return (
        "With llama.cpp or Ollama, straight from the Hub:\n\n```bash\n" + "\n".join(lines) + "\n```\n\n"
        "Or locally, from a copy of this folder: `ollama create NAME -f Modelfile && ollama run NAME`."
    )

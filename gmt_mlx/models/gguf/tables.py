"""The GGUF architecture tables shared by the reader (GGUF -> Hugging Face) and the writer (the way back).

Architecture names and their Hugging Face model types, which architectures
store q/k permuted or norms as 1 + weight, tensor names per architecture,
and the pre-tokenizer regexes llama.cpp names.
"""

from __future__ import annotations

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "phi3", "gemma", "gemma2")
# GGUF architecture -> the Hugging Face model_type / class it converts to.
HF_MODEL_TYPES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "phi3": ("phi3", "Phi3ForCausalLM"),
    "gemma": ("gemma", "GemmaForCausalLM"),
    "gemma2": ("gemma2", "Gemma2ForCausalLM"),
}
# Architectures whose q/k rows llama.cpp stores permuted (GGML's pairwise "normal" rope).
PERMUTED_QK_ARCHITECTURES = ("llama",)
# Gemma's RMSNorm multiplies by (1 + weight); llama.cpp's converter stores the 1 + weight.
NORM_PLUS_ONE_ARCHITECTURES = ("gemma", "gemma2")
# Gemma's activation: GELU with the tanh approximation, as llama.cpp runs it.
GEMMA_ACTIVATION = "gelu_pytorch_tanh"
# Per-frequency rope factors llama.cpp keeps as tensors; folded into config["rope_scaling"].
ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
# Written next to a converted model: where it came from (how a card tells a GGUF base from the Hub's).
GGUF_SOURCE = "gguf_source.json"

# GGUF tensor name (inside blk.N) -> Hugging Face llama module name.
# GGUF tensor name (inside blk.N) -> Hugging Face llama module name.
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
ARCH_LAYER_NAMES = {
    "qwen3": {**LAYER_NAMES, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"},
    "phi3": {  # fused projections, kept fused by llama.cpp
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_qkv": "self_attn.qkv_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_up": "mlp.gate_up_proj",
        "ffn_down": "mlp.down_proj",
    },
    "gemma2": {  # sandwich norms: HF's post_attention_layernorm is llama.cpp's post_attention_norm
        **LAYER_NAMES,
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
}


def layer_names(arch: str) -> dict[str, str]:
    """GGUF tensor kind inside blk.N -> Hugging Face module name, for one GGUF architecture."""
    return ARCH_LAYER_NAMES.get(arch, LAYER_NAMES)


# Pre-tokenizer regexes, paraphrasing llama.cpp's llama-vocab.cpp.
GPT2_STYLE = {"gpt-2", "gpt2", "default", "phi-2", "jais", "poro-chat", "olmo", "dbrx"}
DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "codeshell", "exaone", "minerva", "command-r"}
LLAMA3_STYLE = {"llama-bpe", "llama3", "smaug-bpe", "falcon3", "pixtral"}
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_STYLE = {"qwen2", "deepseek-r1-qwen"}
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")  # single digits

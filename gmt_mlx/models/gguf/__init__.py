"""GGUF both ways: the tables the reader and the writer share, the reader (GGUF -> HF folder) and the
writer (HF folder -> GGUF)."""

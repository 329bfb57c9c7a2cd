"""Models: resolve a --model (resolve), load it (loading), prepare it for a method (methods), write HF
folders (hf), GGUF both ways (gguf/).

Imports only run/ and the bottom layer; never core/ or data/.
"""

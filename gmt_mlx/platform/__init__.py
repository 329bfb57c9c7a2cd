"""The machine under MLX: which BLAS it binds, finding a fast one, checking it, re-executing with it preloaded.

`blas` (what MLX uses and the re-exec) sits on `blas_check` (a preloaded
library proved correct in a child process), which sits on `blas_find`
(candidate libraries and the preload environment).
"""

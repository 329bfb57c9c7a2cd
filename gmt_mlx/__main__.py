"""`python -m gmt_mlx ...` is the same as the `gmt-mlx` command."""

from .cli import main

main()

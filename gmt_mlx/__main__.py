"""`python -m gmt_mlx ...` is the same as the `gmt-mlx` command."""

from gmt_mlx.cli import main

main()

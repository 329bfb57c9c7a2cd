"""The run directory and what writes it: file names and lookup (rundir), checkpoints, metrics and
trackers, progress, the memory estimate, kill hooks.

Imports only the bottom layer (config, errors, paths); every layer above may import it.
"""

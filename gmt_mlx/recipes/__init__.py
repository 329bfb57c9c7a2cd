"""The fine-tuning recipe the CLI runs: plan, setup, outputs, the recipe (each objective's part asked of it).

Imports every layer below; cli/ and compare/ import it.
"""

"""The recipes the CLI runs: finetune (plan, setup, outputs, the recipe) and compare.

Imports every layer below; only cli/ imports it.
"""

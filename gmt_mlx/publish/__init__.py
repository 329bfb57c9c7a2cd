"""What leaves a run: the model card, the export workflow (`gmt-mlx export`), the push to the Hub.

Imports evaluation/ and everything below it.
"""

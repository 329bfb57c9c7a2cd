"""What leaves a run: the model card, the export workflow (`gmt-mlx export`), the push to the Hub.

Imports evaluation/, objectives/ (what the card says of an objective) and everything below them.
"""

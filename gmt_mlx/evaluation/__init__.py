"""Evaluation: losses and generation accuracy on a split, answer scorers, DPO's reference log-probabilities, compare's reports.

Imports core/, data/, models/, run/ and the bottom layer.
"""

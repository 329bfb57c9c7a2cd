"""Evaluation: losses and generation accuracy on a split, greedy answers scored by --scorer or --reward.

Imports objectives/ (GRPO's rewards and reward validation, DPO's reference
log-probabilities), core/, data/, models/, run/ and the bottom layer.
"""

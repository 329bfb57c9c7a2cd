"""Training data: row formats (formats), chat templates and prompt masking (encoding), batches (batching), sources beyond JSONL.

Imports only run/ and the bottom layer (hub for dataset ids); never core/ or models/.
"""

"""Training data: row formats (formats), chat templates and prompt masking (encoding), batches (batching), sources
beyond JSONL, a row's prompt (prompts) and answer scorers against its reference (scorers).

Imports only run/ and the bottom layer (hub for dataset ids); never core/ or models/.
"""

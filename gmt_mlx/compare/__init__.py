"""`gmt-mlx compare`: the plan of runs (`plan`), running and evaluating them (`recipe`), and the report (`report`).

It sits above the recipes (each run is a `finetune`) and asks each run's
objective (gmt_mlx.objectives) what to measure and show.
"""

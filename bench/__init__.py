"""`qlora-flow bench`: the training benchmark, a developer tool beside the pipeline (bench/run.py)."""

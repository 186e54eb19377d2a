"""The gateway benchmark suite: `python -m bench` or `python bench/run.py` (see bench/run.py)."""

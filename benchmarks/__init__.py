"""The performance suite (``make bench``, ``python benchmarks/run.py --quick``); see ``run.py``."""

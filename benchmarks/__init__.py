"""Benchmarks of PrefixPlus against stock PEFT prefix tuning (issue 6). Run them with ``python benchmarks/run.py``."""

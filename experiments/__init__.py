"""Experiments built on the library, not part of it: the quickstart (a tiny base pre-trained and extended on the CPU,
recipes/quickstart.py) and the ablations (bench/ablations.py, docs/ablations.md)."""

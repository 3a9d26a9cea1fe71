"""Training: the flags (config.py), one run from resolved settings to a saved adapter (run.py), the memory switches
(memory.py) and their planner (plan.py), checkpoints, locks and resume (checkpoints.py), the log callbacks
(callbacks.py) and the tiny random model behind every recipe's --tiny (tiny.py)."""

"""Training: the flags (config.py), one run from resolved settings to a saved adapter (run.py), the held-out set during
training (held_out.py), the memory switches
(memory.py), their planner (plan.py) and the plan command's advice (advice.py), checkpoints, locks and resume
(checkpoints.py), the log callbacks (callbacks.py) and the tiny random model behind every recipe's --tiny
(tiny.py)."""

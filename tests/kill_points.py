"""Run a recipe script and kill -9 itself at a chosen point of it (for tests/test_interruptions.py).

    python tests/kill_points.py POINT recipes/extend_7b_8k.py --tiny --output_dir out ...

POINT is `none`, `save:<file>:<step>` (SIGKILL halfway through writing <file> of checkpoint-<step>: half its
bytes are on disk), `publish` (SIGKILL right after the final adapter's weights are moved into place, before its
adapter_config.json) or `sigterm:<rank>:<step>` (the process of that rank sends itself SIGTERM in the first
micro-step of optimizer step <step>, counted from 1: under torchrun, one process of several). The hooks wrap
torch.save, os.replace and Trainer.training_step in this process only; the recipe runs as a script.
"""

import io
import os
import runpy
import signal
import sys
from pathlib import Path

import torch


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def kill_while_saving(name: str, step: int):
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and Path(f).name == name and Path(f).parent.name == f"checkpoint-{step}":
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            with open(f, "wb") as out:
                out.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            die()
        return real_save(obj, f, *args, **kwargs)

    torch.save = save


def kill_while_publishing():
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        if Path(dst).name == "adapter_model.safetensors" and ".partial-" in str(src):
            die()

    os.replace = replace


def sigterm_during_step(rank: int, step: int):
    from transformers import Trainer

    real_step, sent = Trainer.training_step, []

    def training_step(self, *args, **kwargs):
        if not sent and self.state.global_step + 1 == step and int(os.environ.get("RANK", "0")) == rank:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)  # handled at once, in this thread: the step goes on
        return real_step(self, *args, **kwargs)

    Trainer.training_step = training_step


if __name__ == "__main__":
    point, script, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    if point.startswith("save:"):
        _, file, step = point.split(":")
        kill_while_saving(file, int(step))
    elif point == "publish":
        kill_while_publishing()
    elif point.startswith("sigterm:"):
        _, rank, step = point.split(":")
        sigterm_during_step(int(rank), int(step))
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")

"""`accelerate launch --config_file configs/accelerate/fsdp2_qlora.yaml tests/fsdp_worker.py <recipe> <flags>` on a
CPU: accelerate only turns FSDP on for accelerators (its state.py keeps multi-CPU runs plain DDP), so this test-only
wrapper switches the Trainer's accelerator to FSDP with the plugin the launch configured, then runs the recipe as
`python <recipe>` would. Nothing in the library is changed by it."""

import runpy
import sys

from transformers import Trainer

_create = Trainer.create_accelerator_and_postprocess


def _with_fsdp(self):
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    _create(self)
    state = self.accelerator.state
    state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables accelerate launch set
    # Both shared states: accelerate copies the process state's type into the accelerator's when it is rebuilt.
    state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
    self.is_fsdp_enabled = True


Trainer.create_accelerator_and_postprocess = _with_fsdp
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")

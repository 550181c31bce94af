"""`python -m torch.distributed.run ... tests/fsdp_cpu_launch.py convert ...`: `dotmoe convert` with accelerate's FSDP2
path on CPU (gloo).

accelerate only enables FSDP on accelerator devices (a CPU run with an FSDP config silently becomes DDP), so this
launcher switches the process-wide accelerate state to FSDP2 after it is built; everything after that, the auto-wrap
of decoder layers, parameter sharding and the optimizer's parameter swap, is accelerate's own code.
"""

import os
import sys

from accelerate import FullyShardedDataParallelPlugin
from accelerate.utils import DistributedType

import dotmoe.joint_recipe as recipe
import dotmoe.train as train

_build = train.build_accelerator


def _fsdp2_accelerator(cfg):
    accelerator = _build(cfg)
    state = accelerator.state
    state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                                       reshard_after_forward=True, cpu_ram_efficient_loading=False,
                                                       state_dict_type="FULL_STATE_DICT")
    state.distributed_type = DistributedType.FSDP
    return accelerator


train.build_accelerator = _fsdp2_accelerator

if os.environ.get("DOTMOE_TEST_FSDP_REPORT"):  # write the FSDP units of the prepared module (main process)
    _prepare_module = train.MoeTrainingModule.train

    def _train_and_report(self, mode=True):
        from torch.distributed.fsdp import FSDPModule

        units = [name or "<root>" for name, m in self.named_modules() if isinstance(m, FSDPModule)]
        if units and int(os.environ.get("RANK", "0")) == 0:
            with open(os.environ["DOTMOE_TEST_FSDP_REPORT"], "w") as fh:
                fh.write("\n".join(units))
        return _prepare_module(self, mode)

    train.MoeTrainingModule.train = _train_and_report

if os.environ.get("DOTMOE_TEST_DIE_AFTER_CHECKPOINT"):  # a crash right after the first checkpoint is written
    _save = recipe.save_checkpoint

    def _save_then_die(obj, path):
        _save(obj, path)
        os._exit(1)

    recipe.save_checkpoint = _save_then_die

if __name__ == "__main__":
    from dotmoe.cli import main

    sys.exit(main(sys.argv[1:]))

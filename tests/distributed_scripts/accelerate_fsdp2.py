"""Run a module or script under accelerate's own FSDP2 on CPU processes (gloo), for tests.

accelerate 1.15 turns a ``distributed_type: FSDP`` launch into FSDP only after finding a GPU-type backend:
``PartialState._prepare_backend`` probes CUDA, XPU, NPU, ... and otherwise reports ``DistributedType.NO`` (or
``MULTI_CPU`` with ``cpu=True``), which ``AcceleratorState`` never promotes to FSDP. The shim below changes only that
answer: the process group stays gloo and the device the CPU (``ACCELERATE_TORCH_DEVICE``); everything after it (the
promotion to FSDP, ``fully_shard`` in ``fsdp2_prepare_model``, the optimizer swap, ``no_sync``, gradient clipping,
``save_state``) is accelerate's own code. It also prints how many modules FSDP sharded (``FSDP2_UNITS``), and
``TEARDOWN`` if a process reaches the interpreter's teardown (suder's CLI leaves a multi-process run with os._exit).

    accelerate launch --config_file FSDP2.yaml tests/distributed_scripts/accelerate_fsdp2.py suder run ...
    accelerate launch --config_file FSDP2.yaml tests/distributed_scripts/accelerate_fsdp2.py SCRIPT.py ARGS...
"""

import atexit
import os
import runpy
import sys

import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType

assert not torch.accelerator.is_available(), "with GPUs, launch suder itself: accelerate launch -m suder run"
os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
_prepare_backend = PartialState._prepare_backend


def cpu_as_gpu_backend(self, cpu=False, sagemaker_dp=False, backend=None):
    backend, kind = _prepare_backend(self, cpu, sagemaker_dp, backend)
    if kind == DistributedType.NO and backend == "gloo" and int(os.environ.get("LOCAL_RANK", -1)) != -1:
        kind = DistributedType.MULTI_GPU  # what accelerate promotes to FSDP; the group and the device stay CPU ones
    return backend, kind


PartialState._prepare_backend = cpu_as_gpu_backend
atexit.register(print, "TEARDOWN", flush=True)

from torch.distributed.fsdp import FSDPModule  # noqa: E402

from suder.trainer import Trainer  # noqa: E402

_build = Trainer._build


def build_and_count(self, policy):
    engines, reference = _build(self, policy)
    units = sum(isinstance(m, FSDPModule) for engine in engines.values() for m in engine.wrapped.modules())
    if self.acc.is_main_process:
        print("FSDP2_UNITS", units, flush=True)
    return engines, reference


Trainer._build = build_and_count
target, sys.argv = sys.argv[1], sys.argv[1:]
if target.endswith(".py"):
    runpy.run_path(target, run_name="__main__")
else:
    runpy.run_module(target, run_name="__main__", alter_sys=True)

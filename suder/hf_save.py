"""Saving through transformers without waking DeepSpeed (imports nothing of suder).

transformers' ``save_pretrained`` unwraps the model with accelerate's ``extract_model_from_parallel``, which imports
DeepSpeed whenever it is installed, to test for its engine class: seconds, and DeepSpeed's "Setting accelerator"
warning in a process that never launched it. Run outputs (``suder.outputs``) and pre-training (``suder.pretrain``)
both save inside ``no_deepspeed_probe()``; it lives here, below both, because backbones may import the pre-training
helpers but never the run outputs."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def no_deepspeed_probe() -> Iterator[None]:
    """Unless DeepSpeed is already imported (a DeepSpeed launch imports it in ``prepare``), no model can be its
    engine, so accelerate's probe answers "not available" while the block runs."""
    if "deepspeed" in sys.modules:
        yield
        return
    import accelerate.utils.other as other

    probe = other.is_deepspeed_available
    other.is_deepspeed_available = lambda: False
    try:
        yield
    finally:
        other.is_deepspeed_available = probe

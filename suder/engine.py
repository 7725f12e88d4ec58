"""The distributed engine behind one explicit object per trained model, and the frozen reference.

``Engine`` holds what ``accelerator.prepare`` gave back for one trained model (the wrapped module, its optimizer,
its learning-rate schedule and the parameters as the engine holds them) and is the only way the trainer reads
the model:

- ``loss_forward(fn)``: the training forward, ``fn(backbone)`` inside the wrapped module's ``forward``, so that
  DDP, DeepSpeed and FSDP hooks see exactly one forward per backward (``Dispatch``).
- the four ``UnifiedLMM`` methods (``sample_image``, ``sample_text``, ``logp_image_given_text``,
  ``logp_text_given_image``) for the no-grad calls (sampling, rewards, old and reference log-probs): through the
  wrapped module under DDP and ZeRO-2, so that the engine sees every use; with sharded weights (ZeRO-3, FSDP2) on a
  whole-weights view (``suder.distributed.whole_weights``), since samplers call layers one by one and read
  weights outside any module's forward. The trainer enters that view once per rollout phase (``whole``), which
  makes each call's own gathering a no-op.
- ``whole()`` / ``gathered()``: the whole-weights view for the rollout phase (in the compute dtype) and for
  saving or evaluation (in the stored dtype); every process enters.

``Reference`` is the frozen reference (and the ``frozen`` reward scorer): a deep copy of the initial policy, or
for LoRA backbones the policy itself under its ``reference_scope()`` (the adapter switched off, or the frozen copy
of the adapter the run started from, ``snapshot_reference()``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .distributed import compute_dtype, whole_weights
from .protocol import ImageSamples, TextSamples, TokenLogProbs


class Dispatch(nn.Module):
    """``forward(fn) = fn(backbone)``: routes any backbone method through the (DDP/ZeRO/FSDP-)wrapped forward."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        # what accelerate's FSDP ``TRANSFORMER_BASED_WRAP`` shards layer by layer when the config names no class
        present = {type(m).__name__ for m in backbone.modules()}
        self._no_split_modules = sorted(
            {n for m in backbone.modules() for n in getattr(m, "_no_split_modules", None) or [] if n in present}
        )

    def forward(self, fn: Callable[[nn.Module], Any]) -> Any:
        return fn(self.backbone)


@dataclass
class Engine:
    """One trained model as accelerate prepared it (module docstring). ``sharded``: ZeRO-3 or FSDP2."""

    acc: Any  # accelerate.Accelerator
    wrapped: nn.Module  # ``Dispatch(backbone)`` as prepared (DDP, DeepSpeed engine, FSDP2 module, or itself)
    optimizer: Any  # the prepared optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler  # ours, not prepared: one step per training step
    params: list[nn.Parameter]  # the trained parameters as the engine holds them (FSDP2: sharded ones)
    sharded: bool = False

    @property
    def backbone(self) -> nn.Module:
        """The backbone itself (with sharded weights, its parameters are shards outside ``whole``).

        Unwrapped by hand rather than with ``accelerator.unwrap_model``: that imports DeepSpeed whenever it is
        installed (to test for its engine class), which costs seconds and prints DeepSpeed's "Setting accelerator"
        warning in runs that never launch it. DDP and DeepSpeed's engine hold our ``Dispatch`` as ``.module``;
        FSDP2 shards it in place (a subclass of ``Dispatch``)."""
        module = self.wrapped
        while not isinstance(module, Dispatch):
            module = module.module
        return module.backbone

    @property
    def name(self) -> str:
        return self.backbone.name

    def train(self) -> None:
        self.backbone.train()

    def eval(self) -> None:
        self.backbone.eval()

    # ------------------------------------------------------------------ calls
    def loss_forward(self, fn: Callable[[nn.Module], Any]) -> Any:
        """``fn(backbone)`` as the engine's training forward (one per backward)."""
        return self.wrapped(fn)

    def _call(self, fn: Callable[[nn.Module], Any]) -> Any:
        """A no-grad call: on the whole-weights view with sharded weights, else through the wrapped forward."""
        if self.sharded:
            with whole_weights(self.wrapped, self.backbone) as whole:
                return fn(whole)
        return self.wrapped(fn)

    def call(self, fn: Callable[[nn.Module], Any]) -> Any:
        """``fn(backbone)`` as one no-grad call: ``suder.rollout.Chunked`` runs all of a pass's chunks in one, so
        that every process makes the same calls of the wrapped module whatever its chunks."""
        return self._call(fn)

    def sample_image(self, prompts: Any, **options: Any) -> ImageSamples:
        return self._call(lambda m: m.sample_image(prompts, **options))

    def sample_text(self, images: Any, **options: Any) -> TextSamples:
        return self._call(lambda m: m.sample_text(images, **options))

    def logp_image_given_text(self, images: Any, texts: Any, **options: Any) -> TokenLogProbs:
        return self._call(lambda m: m.logp_image_given_text(images, texts, **options))

    def logp_text_given_image(self, texts: Any, images: Any, **options: Any) -> TokenLogProbs:
        return self._call(lambda m: m.logp_text_given_image(texts, images, **options))

    # ------------------------------------------------------------------ whole weights
    def whole(self) -> contextlib.AbstractContextManager[Any]:
        """Every process enters: with sharded weights, gathered once in the engine's compute dtype (so that
        log-probs from the view and from the training forward agree); inside, each process calls the model as
        often as its own samples need, with no collectives. Without sharding, nothing to do."""
        if not self.sharded:
            return contextlib.nullcontext(self.backbone)
        return whole_weights(self.wrapped, self.backbone, compute_dtype(self.acc))

    def gathered(self) -> contextlib.AbstractContextManager[nn.Module]:
        """The backbone with whole weights in their stored dtype, for saving; every process enters."""
        return whole_weights(self.wrapped, self.backbone)


class Reference:
    """The frozen reference: ``model`` (a frozen deep copy, or an ``Engine``/backbone of the policy), read under
    ``scope.reference_scope()`` when ``scope`` is given (LoRA: the policy's initial adapter)."""

    def __init__(self, model: Any, scope: nn.Module | None = None):
        self.model, self.scope = model, scope

    def _scoped(self) -> contextlib.AbstractContextManager[Any]:
        return self.scope.reference_scope() if self.scope is not None else contextlib.nullcontext()

    def sample_image(self, prompts: Any, **options: Any) -> ImageSamples:
        with self._scoped():
            return self.model.sample_image(prompts, **options)

    def sample_text(self, images: Any, **options: Any) -> TextSamples:
        with self._scoped():
            return self.model.sample_text(images, **options)

    def logp_image_given_text(self, images: Any, texts: Any, **options: Any) -> TokenLogProbs:
        with self._scoped():
            return self.model.logp_image_given_text(images, texts, **options)

    def logp_text_given_image(self, texts: Any, images: Any, **options: Any) -> TokenLogProbs:
        with self._scoped():
            return self.model.logp_text_given_image(texts, images, **options)


@contextlib.contextmanager
def entered(views: list[contextlib.AbstractContextManager[Any]]) -> Iterator[None]:
    """Enter ``views`` in order (every process the same order), leave them in reverse."""
    with contextlib.ExitStack() as stack:
        for view in views:
            stack.enter_context(view)
        yield

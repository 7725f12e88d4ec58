"""Loading Janus-Pro-1B / 7B and ``build_janus_pro``, the factory of ``load_backbone("janus-pro", ...)``.

``model`` is a hub id (default ``deepseek-community/Janus-Pro-1B``; ``deepseek-community/Janus-Pro-7B`` works the
same way) or a local folder written by ``save_pretrained``. The adapter (``JanusProBackbone``, in ``modeling``)
exposes ``.model`` (the transformers model) and ``.processor``; transformers is imported only when a backbone is
built. See ``docs/backbones/janus-pro.md`` for memory needs, LoRA and the CFG policy.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from ...errors import BackboneError
from .modeling import ADAPTER_DIR, SETTINGS_FILE, JanusProBackbone

DEFAULT_MODEL = "deepseek-community/Janus-Pro-1B"
DTYPES = {"auto": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "half": torch.float16, "fp32": torch.float32, "float32": torch.float32,
          "float": torch.float32, "fp64": torch.float64, "float64": torch.float64}


def resolve_dtype(dtype: Any, device: Any = None) -> torch.dtype | str:
    """The dtype to load in: ``"bfloat16"``, ``"bf16"``, ``torch.bfloat16`` -> ``torch.bfloat16``; ``"auto"`` ->
    ``"auto"`` (the checkpoint's own); ``None`` -> ``default_dtype(device)``."""
    if dtype is None:
        return default_dtype(resolve_device(device))
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise BackboneError(f"Unknown dtype '{dtype}' for janus-pro; use bfloat16, float16, float32 or auto.")
    return DTYPES[key] or "auto"


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 (the released checkpoints' precision) on a GPU, float32 on CPU.

    On CPU bfloat16 saves memory but not time: its small matrix products run slower than float32 ones
    (``docs/performance.md``), and sampled and teacher-forced log-probs drift apart (``ImageSamples.logps``).
    Pass ``dtype="bfloat16"`` to ask for it.
    """
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def resolve_device(device: Any) -> torch.device:
    """``None``: this process's GPU under ``accelerate launch`` / ``torchrun`` (``LOCAL_RANK``), else ``cuda``
    when available, else ``cpu`` (so eight launched processes never all load onto GPU 0)."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return torch.device("cpu")


def _looks_local(model: str) -> bool:
    """A path rather than an ``owner/name`` hub id."""
    return os.path.isdir(model) or model.startswith((".", "/", "~")) or model.count("/") > 1


def load_pretrained(model: str, dtype: Any = None, device: Any = None, cache_dir: str | None = None,
                    revision: str | None = None, attn_implementation: str | None = None):
    """(transformers model, processor, saved settings) from a hub id or folder; a one-line ``BackboneError``
    naming the fix when the weights are not there."""
    from transformers import JanusForConditionalGeneration, JanusProcessor

    path = os.path.expanduser(model)
    if _looks_local(model) and not os.path.isdir(path):
        raise BackboneError(f"No Janus-Pro model at '{model}': the folder does not exist; pass a folder "
                            f"written by save_pretrained or a hub id such as '{DEFAULT_MODEL}'.")
    source = path if os.path.isdir(path) else model
    hub: dict[str, Any] = {"cache_dir": cache_dir, "revision": revision}
    attn = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        processor = JanusProcessor.from_pretrained(source, **hub)
        net = JanusForConditionalGeneration.from_pretrained(
            source, dtype=resolve_dtype(dtype, device), device_map=resolve_device(device), **attn, **hub)
    except OSError as exc:
        if os.path.isdir(path):
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise BackboneError(f"'{model}' is not a Janus-Pro model folder ({first}).") from exc
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
        where = "offline and not in the Hugging Face cache" if offline else "here"
        raise BackboneError(f"Janus-Pro weights '{model}' are not available {where}; download them on a "
                            f"connected machine with `hf download {model}` (then copy the cache) or pass "
                            "model=/path/to/local/folder.") from exc
    settings: dict[str, Any] = {}
    if os.path.isfile(os.path.join(path, SETTINGS_FILE)):
        with open(os.path.join(path, SETTINGS_FILE)) as f:
            settings = json.load(f)
        settings.pop("backbone", None)
    return net, processor, settings


def build_janus_pro(model: Any = DEFAULT_MODEL, *, processor: Any = None, dtype: Any = None,
                    device: Any = None, lora: dict[str, Any] | bool | None = None,
                    cache_dir: str | None = None, revision: str | None = None,
                    attn_implementation: str | None = None, **settings: Any):
    """Factory of ``load_backbone("janus-pro", ...)``.

    ``model``: hub id, local folder, or an already-built ``JanusForConditionalGeneration`` (then pass
    ``processor=``; dtype and device are the caller's). ``dtype``: default ``bfloat16`` (the checkpoint's
    precision) on a GPU and ``float32`` on CPU (``default_dtype``); ``bfloat16``, ``float32``, ``float16`` or
    ``auto`` (as stored) ask for one. ``device``: default this process's GPU, else CPU.
    ``lora``: ``None`` (full fine-tuning), ``True`` (defaults) or a dict of ``peft.LoraConfig`` fields.
    Other settings (``guidance_scale=5.0``, ``cfg_policy="guided"``, ``caption_instruction``,
    ``max_caption_tokens=256``, ``freeze_vision_encoder=True``, ...) are described on ``JanusProBackbone``.
    A folder written by ``save_pretrained`` restores its settings (unless overridden here) and its adapter.
    """
    if not isinstance(model, (str, os.PathLike)):
        if processor is None:
            raise BackboneError("Pass processor=JanusProcessor(...) with an already-built Janus model.")
        return JanusProBackbone.from_model(model, processor, lora=lora, **settings)
    name = os.fspath(model)
    net, proc, saved = load_pretrained(name, dtype=dtype, device=device, cache_dir=cache_dir,
                                       revision=revision, attn_implementation=attn_implementation)
    adapter = os.path.join(os.path.expanduser(name), ADAPTER_DIR)
    saved_lora = saved.pop("lora", None)
    has_adapter = saved_lora is not None and os.path.isdir(adapter)
    if has_adapter:  # a LoRA run: base weights + adapter; adapter on again, the base is the reference
        if isinstance(lora, dict) and lora != saved_lora:
            raise BackboneError(f"'{name}' holds a LoRA adapter {saved_lora}, not lora={lora}; drop the "
                                "lora option, or export merged weights: save_pretrained(merge_lora=True).")
        lora = saved_lora
    backbone = JanusProBackbone.from_model(net, processor or proc, lora=lora, **{**saved, **settings})
    if has_adapter:
        backbone.load_adapter(adapter)
    return backbone


def shapes_recipe():
    """Janus-Pro's ShapesWorld recipe (``shapes_world.recipe``), imported when first needed."""
    from .shapes_world import recipe

    return recipe()

"""A memory plan before any weight loads: peak memory per process of a run, by phase, from configs alone.

``plan(cfg)`` reads the backbone's config (the model is built on PyTorch's ``meta`` device: shapes, no storage),
and the run's settings, and adds up what one process holds:

- **weights** of every model the run keeps (the policy; a second one for ``strategy: separate``), divided by the
  processes under ZeRO-3 and FSDP2, which shard them; while the rollout reads whole weights (``whole_weights``)
  a sharded run gathers a full copy on top of its shard;
- **reference**: the frozen copy that a GRPO KL term, ``simpo_kl_beta``, a frozen reward scorer, the held-out
  self-evaluation or the ``dsr-consensus`` reward reads; under LoRA the reference is the adapters only
  (``reference_scope``);
- **gradients** of the trained parameters (the directions' ``trainable_parameters``, or the LoRA adapters, kept
  in float32 by the backbones): divided by the processes under ZeRO-2, ZeRO-3 and FSDP2; DDP with several
  processes keeps a second copy in its buckets;
- **optimizer**: AdamW's two moments per trained parameter, in the parameter's dtype (torch's AdamW); DeepSpeed with
  mixed precision keeps float32 moments and a float32 master copy, and holds the weights in 16 bits;
- **rollout**: the KV cache of sampling ``layers x 2 x kv_heads x head_dim x tokens x rows x bytes``, where an
  image rollout's rows are the samples of a chunk (default: the whole group batch) times 2 under classifier-free
  guidance; plus the step's logits; a masked-image sampler (Show-o) has no cache and runs whole forwards instead;
- **activations** of the update: per token and layer, the tensors autograd saves (below), for the rows the loss
  forwards (SimPO: the pairs' rows; GRPO: every row), the prompt plus image tokens for ``gen`` and the image plus
  caption tokens for ``und``, both directions alive at once (their losses are summed before one backward);
  with gradient checkpointing only each layer's input, plus one layer of one forward, recomputed in the backward;
- **logits** the log-probabilities are taken from (kept for the backward) and no-grad forwards' working sets.

The peak is the largest of three phases, each on top of what persists (weights, reference, optimizer): the
**rollout** (sampling), the **scoring** (rewards, GRPO's old and reference log-probs: no-grad forwards, in rollout
chunks) and the **update** (activations, logits and gradients). The plan states which phase peaks.
``rollout_chunk_size: auto`` on a GPU starts from the largest chunk whose plan fits (``auto_chunk``).

Saved activations per token per layer, in elements of the compute dtype (measured with
``torch.autograd.graph.saved_tensors_hooks`` on transformers' layers, and checked against whole training steps by
``benchmarks/memory_plan.py``): Llama (Janus-Pro, toy) ``11 h + 4 i`` (input, norms, q, k, v, rotated q and k,
attention output, residual; gate, up, activation, product) plus ``0.9 T`` with SDPA or ``heads x T`` with eager
attention (the toy), and RMSNorm's float32 copies in 16-bit runs (``4 h`` bytes); Phi (Show-o) ``10 h + 5.1 i +
0.9 T`` (LayerNorms, q/k LayerNorm, the tanh GELU's intermediates). ``h``: hidden size, ``i``: MLP size, ``T``:
sequence length.

Not counted: the CUDA context and allocator fragmentation (a few hundred MB to a few GB on a GPU: the fit check keeps
a margin), the data, sample grids and evaluation. A backbone from a plugin gives its facts through an optional
``memory_facts`` attribute of its factory (``docs/writing-a-plugin.md``); without one there is no plan.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BackboneError, ConfigError

GiB = 1024**3
ENGINES = ("ddp", "zero2", "zero3", "fsdp2")
FIT_MARGIN = 0.9  # of the device's memory: the CUDA context, fragmentation and what the plan leaves out
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
# Peak of a convolutional image tokenizer's forward per image, in units of channels x pixels x bytes at full
# resolution (measured with torch.profiler on Janus-Pro's VQ decoder and encoder at 384 px, 32 to 128 base
# channels, float32 and bfloat16, 1 to 4 images: 4.0 and 4.27-4.36, linear in the images).
CODEC_DECODE, CODEC_ENCODE = 4.1, 4.4


@dataclass
class Geometry:
    """The transformer that does the work: sizes from its config, and which family's activation formula applies."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    family: str = "llama"  # "llama" (RMSNorm, gated MLP) or "phi" (LayerNorm, plain MLP with tanh GELU)
    attention: str = "sdpa"  # "sdpa" (no score matrix kept) or "eager" (keeps heads x T x T probabilities)

    def saved_per_token(self, seq: int, act: int) -> float:
        """Bytes autograd keeps per token per layer (see the module docstring), for a sequence of ``seq`` tokens."""
        h, i = self.hidden, self.intermediate
        scores = self.heads * seq if self.attention == "eager" else 0.9 * seq
        if self.family == "phi":
            return act * (10 * h + 5.1 * i + scores)
        return act * (11 * h + 4 * i + scores) + (4 * h if act == 2 else 0)

    def working_set(self, seq: int, act: int, device: str = "cuda") -> float:
        """Bytes per token of one layer's forward without autograd (the largest tensors alive at once). Attention
        scores and probabilities (heads x T each) exist with eager attention; SDPA on CPU under a mask holds about
        0.9 T (as in ``saved_per_token``), CUDA's SDPA kernels nothing of that size."""
        scores = 2 * self.heads * seq if self.attention == "eager" else (0.9 * seq if device == "cpu" else 0)
        return act * (4 * self.hidden + 2 * self.intermediate + scores)


@dataclass
class ModelFacts:
    """What a plan needs to know of a model, read from its config without loading weights."""

    backbone: str
    weights: int  # elements of every parameter and buffer (policy, image tokenizer, vision encoder)
    weight_bytes: int  # as loaded
    dtype: str  # of the trained weights
    trainable: dict[str, int]  # "gen", "und", "unified" -> trained parameters under full fine-tuning
    lora: int  # adapter parameters under the backbone's LoRA (the run's options, else its default); 0: no LoRA
    lm: Geometry
    image_tokens: int  # N
    image_vocab: int  # width of the image logits
    text_vocab: int  # width of the caption logits
    prompt_tokens: int  # a text-to-image prompt, template included (typical)
    und_prefix: int  # tokens before a caption: the image and the instruction
    caption_tokens: int  # the most a sampled caption may have
    image_sampler: str = "autoregressive"  # or "masked" (MaskGIT: no KV cache, a whole forward per step)
    sampling_steps: int = 0  # masked sampler: forwards per image
    guidance: float = 1.0  # the backbone's default classifier-free guidance scale
    checkpointing: bool = True  # the backbone has gradient_checkpointing_enable
    codec_channels: int = 0  # the image tokenizer's channels at full resolution (0: no convolutional tokenizer)
    image_size: int = 0  # pixels per side
    codec_batch: int = 1  # images per decode call
    source: str = ""  # where the config came from

    @property
    def param_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]


@dataclass
class Term:
    name: str
    bytes: float
    note: str = ""


@dataclass
class MemoryPlan:
    """Bytes per process: ``persistent`` terms (held throughout) and each phase's terms on top of them."""

    backbone: str
    engine: str
    processes: int
    persistent: list[Term]
    phases: dict[str, list[Term]]
    facts: ModelFacts
    settings: dict[str, Any] = field(default_factory=dict)

    def total(self, phase: str) -> float:
        return sum(t.bytes for t in self.persistent) + sum(t.bytes for t in self.phases[phase])

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.total)

    @property
    def peak(self) -> float:
        return self.total(self.peak_phase)

    def to_dict(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone,
            "engine": self.engine,
            "processes": self.processes,
            "settings": self.settings,
            "persistent": {t.name: t.bytes for t in self.persistent},
            "phases": {
                p: {t.name: t.bytes for t in terms} | {"total": self.total(p)} for p, terms in self.phases.items()
            },
            "peak_phase": self.peak_phase,
            "peak_bytes": self.peak,
            "peak_gib": round(self.peak / GiB, 3),
        }


# ------------------------------------------------------------------------------------------ model facts
def parse_bytes(text: str | float | int) -> int:
    """``80GiB``, ``24GB``, ``512MiB``, ``1e9`` -> bytes (GB and GiB both read as powers of 1024 here would be
    wrong: GB is 1e9, GiB 2**30)."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([KMGT]i?B?|B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConfigError(f"--device-memory '{text}' is not a size; write it as 80GiB, 24GB or 40960MiB.")
    unit = (m.group(2) or "B").upper().rstrip("B") or "B"
    scale = {"B": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
    return int(float(m.group(1)) * scale[unit])


def _count(module: Any) -> tuple[int, int]:
    """(elements, bytes) of a module's parameters and buffers."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() for t in tensors), sum(t.numel() * t.element_size() for t in tensors)


def _lora_count(module: Any, options: dict[str, Any]) -> int:
    """Parameters of LoRA adapters ``r x (in + out)`` on the linear layers whose names match ``target_modules``
    (a regular expression matched in full, as peft does, or a list of name suffixes)."""
    from torch import nn

    r, targets = int(options.get("r", 8)), options["target_modules"]
    total = 0
    for name, m in module.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        hit = re.fullmatch(targets, name) if isinstance(targets, str) else any(
            name == t or name.endswith("." + t) for t in targets
        )
        total += r * (m.in_features + m.out_features) if hit else 0
    return total


def _trainable(params_of: Any) -> dict[str, int]:
    """Trained parameters of ``gen``, ``und`` and both (``unified``: the union), from ``trainable_parameters``."""
    sets = {d: {id(p): p for p in params_of(d)} for d in ("gen", "und")}
    counts = {d: sum(p.numel() for p in s.values()) for d, s in sets.items()}
    counts["unified"] = sum(p.numel() for p in (sets["gen"] | sets["und"]).values())
    return counts


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _read_json(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def _toy_facts(model: str | None, options: dict[str, Any], device: str) -> ModelFacts:
    import numpy as np
    import torch

    from .backbones.toy import NUM_IMAGE_TOKENS, ToyConfig, ToyUnifiedLM, build_codebook

    saved = Path(model) / "config.json" if model else None
    fields_ = {f.name for f in dataclasses.fields(ToyConfig)}
    if saved is not None and saved.is_file():
        values = {k: v for k, v in _read_json(saved).items() if k in fields_}
    else:
        values = {k: v for k, v in options.items() if k in fields_}
    num_codes = int(values.pop("num_codes", 0) or len(build_codebook()))
    with torch.device("meta"):
        net = ToyUnifiedLM(ToyConfig(**values), codebook=np.zeros((num_codes, 48), np.uint8))
    c = net.config
    n, nbytes = _count(net)
    trainable = _trainable(net.trainable_parameters)
    vocab = net.lm.config.vocab_size
    geometry = Geometry(c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_heads,
                        c.hidden_size // c.num_heads, "llama", "eager")
    return ModelFacts("toy", n, nbytes, "float32", trainable, 0, geometry, NUM_IMAGE_TOKENS, vocab, vocab,
                      prompt_tokens=12, und_prefix=NUM_IMAGE_TOKENS + 4, caption_tokens=c.max_caption_tokens,
                      guidance=float(c.guidance_scale), source=str(saved) if saved else "ToyConfig defaults",
                      checkpointing=callable(getattr(net, "gradient_checkpointing_enable", None)))


# The converted checkpoints' configs (deepseek-community/Janus-Pro-1B and -7B, config.json): the text model's sizes
# and the projection widths; the vision encoder (SigLIP-L, 384 px, 576 tokens) and the VQ model (16384 codes) are
# JanusConfig's defaults, which are theirs. tests/test_memory.py checks the parameter counts (2.08B and 7.42B).
def _janus(hidden: int, intermediate: int, layers: int, heads: int) -> dict[str, Any]:
    text = dict(model_type="llama", hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=heads, head_dim=128, vocab_size=102400,
                max_position_embeddings=16384, tie_word_embeddings=False)
    return dict(text_config=text, vision_config=dict(projection_dim=hidden),
                vq_config=dict(projection_dim=hidden, image_token_embed_dim=hidden), tie_word_embeddings=False)


JANUS_PRO_CONFIGS = {
    "deepseek-community/Janus-Pro-1B": _janus(2048, 5632, 24, 16),
    "deepseek-community/Janus-Pro-7B": _janus(4096, 11008, 30, 32),
}
SHOW_O_CONFIGS = {  # showlab's config.json: Phi-1.5 sizes (the Showo defaults) and the image tokens
    "showlab/show-o": dict(num_vq_tokens=256),
    "showlab/show-o-512x512": dict(num_vq_tokens=1024, max_position_embeddings=2048),
}


def _hub_config(model: str, known: dict[str, dict[str, Any]], filename: str = "config.json") -> tuple[dict, str]:
    """A model's config without its weights: a local folder's file, a known checkpoint's facts, or the file in the
    Hugging Face cache; else a one-line ``BackboneError``."""
    path = Path(os.path.expanduser(model)) / filename
    if path.is_file():
        return _read_json(path), str(path)
    if model in known:
        return known[model], f"{model} (config facts in suder.memory)"
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, filename)
    except Exception:  # an id that is not a repo name
        cached = None
    if isinstance(cached, str) and os.path.isfile(cached):
        return _read_json(Path(cached)), cached
    raise BackboneError(f"No config for '{model}' here (not a folder, not in the Hugging Face cache); pass a "
                        f"local folder or one of {', '.join(known)}.")


def _janus_facts(model: str | None, options: dict[str, Any], device: str) -> ModelFacts:
    import types

    import torch
    from transformers import JanusConfig, JanusForConditionalGeneration

    from .backbones.janus_pro.backbone import DEFAULT_MODEL, resolve_dtype
    from .backbones.janus_pro.modeling import DEFAULT_LORA, SETTINGS_FILE, JanusProBackbone

    name = str(model or DEFAULT_MODEL)
    config, source = _hub_config(name, JANUS_PRO_CONFIGS)
    config = {k: v for k, v in config.items() if k not in ("architectures", "transformers_version")}
    settings = {}
    if (Path(name) / SETTINGS_FILE).is_file():
        settings = _read_json(Path(name) / SETTINGS_FILE)
    settings |= options
    dtype = resolve_dtype(options.get("dtype"), device)
    dtype = getattr(torch, config.get("torch_dtype") or config.get("dtype") or "bfloat16") if dtype == "auto" else dtype
    with torch.device("meta"):
        net = JanusForConditionalGeneration(JanusConfig(**config)).to(dtype)
    view = types.SimpleNamespace(model=net, freeze_vision_encoder=settings.get("freeze_vision_encoder", True))
    trainable = _trainable(lambda d: JanusProBackbone.trainable_parameters(view, d))
    lora = settings.get("lora")
    adapters = _lora_count(net, {**DEFAULT_LORA, **(lora if isinstance(lora, dict) else {})})  # offered either way
    n, nbytes = _count(net)
    t = net.config.text_config
    heads = t.num_attention_heads
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // heads
    geometry = Geometry(t.num_hidden_layers, t.hidden_size, t.intermediate_size, heads,
                        t.num_key_value_heads or heads, head_dim, "llama", options.get("attn_implementation", "sdpa"))
    image_tokens = int(net.config.vision_config.num_image_tokens)
    vq = net.config.vq_config
    return ModelFacts("janus-pro", n, nbytes, _dtype_name(dtype), trainable, adapters, geometry, image_tokens,
                      int(vq.num_embeddings), int(t.vocab_size), prompt_tokens=48,
                      und_prefix=image_tokens + 48, caption_tokens=int(settings.get("max_caption_tokens", 256)),
                      guidance=float(settings.get("guidance_scale", 5.0)), source=source,
                      codec_channels=int(vq.base_channels * vq.channel_multiplier[0]),
                      image_size=int(net.config.vision_config.image_size),
                      codec_batch=int(settings.get("decode_batch_size", 8)))


DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # short names the factories accept


def _show_o_facts(model: str | None, options: dict[str, Any], device: str) -> ModelFacts:
    import torch

    from .backbones.show_o.backbone import CHUNK, DEFAULTS, SETTINGS_FILE, VQ_FOLDER, ShowOSettings, readme_sampling
    from .backbones.show_o.magvit import MAGVITv2
    from .backbones.show_o.modeling import Showo

    name = str(model or DEFAULTS["model"])
    config, source = _hub_config(name, SHOW_O_CONFIGS)
    known = {f.name for f in dataclasses.fields(ShowOSettings)}
    settings = _read_json(Path(name) / SETTINGS_FILE) if (Path(name) / SETTINGS_FILE).is_file() else {}
    settings = {k: v for k, v in (settings | options).items() if k in known and v is not None}
    vq_config = {}
    vq_path = Path(name) / VQ_FOLDER / "config.json"
    if vq_path.is_file():
        vq_config = {k: v for k, v in _read_json(vq_path).items() if not k.startswith("_")}
    name_of_dtype = str(options.get("dtype") or "float32").removeprefix("torch.")
    dtype = getattr(torch, DTYPE_ALIASES.get(name_of_dtype, name_of_dtype))
    showo_args = {k: v for k, v in config.items() if not k.startswith("_") and k != "architectures"}
    with torch.device("meta"):  # float32 on meta; the bytes are counted at the run's dtype
        showo = Showo(**showo_args)
        vq = MAGVITv2(**vq_config)
    n1, n2 = _count(showo)[0], _count(vq)[0]
    b1, b2 = n1 * DTYPE_BYTES[_dtype_name(dtype)], n2 * DTYPE_BYTES[_dtype_name(dtype)]
    trainable = {d: sum(p.numel() for p in showo.showo.parameters()) for d in ("gen", "und", "unified")}
    c = showo.config
    tokens = int(c.num_vq_tokens)
    resolution = math.isqrt(tokens) * int(getattr(vq, "downsample_factor", 16))
    readme = readme_sampling(resolution)
    geometry = Geometry(c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
                        c.num_attention_heads, c.hidden_size // c.num_attention_heads, "phi", "sdpa")
    return ModelFacts(
        "show-o", n1 + n2, b1 + b2, _dtype_name(dtype), trainable, 0, geometry, tokens, int(c.codebook_size),
        int(c.llm_vocab_size), prompt_tokens=int(c.max_text_len) + 1, und_prefix=tokens + 4,
        caption_tokens=int(settings.get("max_caption_tokens", 64)), image_sampler="masked",
        sampling_steps=int(settings.get("steps") or readme["steps"]),
        guidance=1.0 + float(settings.get("guidance_scale") or readme["guidance_scale"]), source=source,
        codec_channels=int(vq.config.ch * vq.config.decoder_ch_mult[0]), image_size=resolution, codec_batch=CHUNK,
    )


BUILT_IN = {"toy": _toy_facts, "janus-pro": _janus_facts, "show-o": _show_o_facts}


def shapes_base_path(backbone: str) -> Path | None:
    """The folder ``suder.pretrain.ensure_base`` builds the backbone's ShapesWorld base in (it may not exist yet)."""
    from .pretrain import PRETRAIN_DEFAULTS, cache_dir, shapes_recipe

    recipe = shapes_recipe(backbone)
    if recipe is None:
        return None
    steps = recipe.pretrain.get("steps", PRETRAIN_DEFAULTS["steps"])
    seed = recipe.pretrain.get("seed", PRETRAIN_DEFAULTS["seed"])
    return cache_dir() / f"{backbone}-base-{recipe.version}-steps{steps}-seed{seed}"


def model_facts(backbone: str, model: str | None = None, options: dict[str, Any] | None = None,
                device: str = "cuda") -> ModelFacts:
    """The facts of ``backbone`` (``model``: a folder or hub id; ``options``: the factory's options, such as
    ``lora`` and ``dtype``), from configs and a ``meta``-device build: nothing is downloaded or loaded. ``device``:
    where the run would train (the default dtype of Janus-Pro depends on it)."""
    from .registry import get_backbone_spec

    options = dict(options or {})
    spec = get_backbone_spec(backbone)
    hook = getattr(spec.factory, "memory_facts", None)
    if callable(hook):
        facts = hook(model=model, device=device, **options)
        if not isinstance(facts, ModelFacts):
            raise BackboneError(f"The {backbone} backbone's memory_facts gave {type(facts).__name__}, not "
                                "suder.memory.ModelFacts; return one.")
        return facts
    if backbone not in BUILT_IN:
        raise BackboneError(f"The {backbone} backbone gives no memory facts (its factory has no memory_facts), so "
                            "there is no memory plan; see docs/writing-a-plugin.md.")
    return BUILT_IN[backbone](model, options, device)


def facts_for(cfg: Any, device: str = "cuda") -> ModelFacts:
    """The facts of a run's model: ``cfg.model``, or the ShapesWorld base the run starts from."""
    model = cfg.model
    if model is None and (cfg.backbone == "toy" or cfg.shapes_world):
        base = shapes_base_path(cfg.backbone)
        if base is not None and base.is_dir():
            model = str(base)
        elif cfg.backbone != "toy":  # the toy's base is the default ToyConfig; the others' are built by a recipe
            raise BackboneError(f"The {cfg.backbone} ShapesWorld base is not built yet ({base}); `suder run` builds "
                                "it on first use (or `suder pretrain`), or pass --model to plan for a checkpoint.")
    return model_facts(cfg.backbone, model, cfg.backbone_options, device)


# ------------------------------------------------------------------------------------------ the plan
def needs_reference(cfg: Any) -> bool:
    """Whether the run keeps a frozen copy of the initial model (as ``Trainer._needs_reference`` decides)."""
    from .rewards import needs_reference as reward_needs

    und = "und" in cfg.directions and reward_needs(cfg.und.reward, cfg.to_dict())
    frozen = cfg.strategy != "separate" and any(cfg.side(d).reward_scorer == "frozen" for d in cfg.directions)
    grpo_kl = cfg.grpo_beta > 0 and any(cfg.algo_for(d) == "grpo" for d in cfg.directions)
    selfeval = bool(getattr(cfg, "eval_every", 0) and getattr(cfg, "selfeval_num", 0))  # the frozen base scores it
    return grpo_kl or cfg.simpo_kl_beta > 0 or und or frozen or selfeval


def _chunk(cfg: Any, samples: int, chunk: int | None) -> int:
    """Samples a rollout call holds at once: ``chunk``, else the run's ``rollout_chunk_size`` when it is a
    number, else the whole group batch."""
    if chunk is None:
        setting = getattr(cfg, "rollout_chunk_size", None)  # a setting that may not exist in this version
        chunk = setting if isinstance(setting, int) and not isinstance(setting, bool) else None
    return max(1, min(samples, chunk or samples))


def _update_rows(cfg: Any, d: str) -> int:
    """Rows the loss forwards per micro-batch: SimPO's pairs' rows, GRPO's every row (the worst case)."""
    side = cfg.side(d)
    if cfg.algo_for(d) == "simpo" and side.simpo_pairs != "all":
        return 2 * side.batch_size
    return side.batch_size * side.group_size


def plan(cfg: Any, facts: ModelFacts | None = None, *, engine: str = "ddp", processes: int = 1,
         device: str = "cuda", chunk: int | None = None) -> MemoryPlan:
    """The memory plan of run ``cfg`` per process (see the module docstring). ``engine``: ddp, zero2, zero3 or
    fsdp2; ``processes``: how many share the work; ``chunk``: samples per rollout call (default: the run's
    ``rollout_chunk_size``, else the whole group batch)."""
    if engine not in ENGINES:
        raise ConfigError(f"Unknown engine '{engine}'; use one of {', '.join(ENGINES)}.")
    if processes < 1:
        raise ConfigError(f"processes must be >= 1, got {processes}.")
    f = facts or facts_for(cfg, device)
    g = f.lm
    mixed = cfg.mixed_precision != "no"
    checkpointing = cfg.gradient_checkpointing and f.checkpointing
    deepspeed_mixed = engine.startswith("zero") and mixed and f.param_bytes == 4
    act = 2 if (mixed or f.param_bytes == 2) else 4
    lora = bool(cfg.backbone_options.get("lora")) and f.lora > 0
    shard_w = processes if engine in ("zero3", "fsdp2") else 1
    shard_g = processes if engine != "ddp" else 1
    keys = ["gen", "und"] if cfg.strategy == "separate" else ["unified" if cfg.strategy == "unified" else cfg.strategy]
    trained = sum(f.lora if lora else f.trainable[k] for k in keys)
    weight_bytes = f.weights * 2 if deepspeed_mixed else f.weight_bytes
    grad_b = 4 if lora else (2 if deepspeed_mixed else f.param_bytes)
    state_b = 4 if (lora or deepspeed_mixed) else f.param_bytes
    persistent = [Term("weights", len(keys) * weight_bytes / shard_w,
                       f"{f.weights / 1e9:.3g}B parameters" + (f" x {len(keys)} models" if len(keys) > 1 else ""))]
    if needs_reference(cfg):
        ref = Term("reference", f.lora * 4, "LoRA: the adapters only") if lora else Term(
            "reference", f.weight_bytes, "frozen copy of the initial model")
        persistent.append(ref)
    persistent.append(Term("optimizer", trained * 2 * state_b / shard_g, f"AdamW moments of {trained / 1e6:.4g}M"))
    if deepspeed_mixed:
        persistent.append(Term("master weights", trained * 4 / shard_g, "float32 copies (DeepSpeed)"))
    gathered = [Term("gathered weights", weight_bytes * (1 - 1 / shard_w), "whole_weights")] if shard_w > 1 else []
    guidance = cfg.guidance_scale if cfg.guidance_scale is not None else f.guidance
    cfg_rows = 2 if guidance != 1 else 1
    kv_b = 4 if device == "cpu" else act  # the fast sampler keeps a CPU cache in float32
    phases: dict[str, list[Term]] = {"rollout": [], "scoring": [], "update": [], "optimizer step": []}
    # ---- rollout: the largest direction (they run one after the other)
    rollouts: list[list[Term]] = []
    for d in cfg.directions:
        side = cfg.side(d)
        n = _chunk(cfg, side.batch_size * side.group_size, chunk)
        if d == "gen" and f.image_sampler == "masked":
            seq, rows = f.prompt_tokens + f.image_tokens + 2, n * cfg_rows
            rollouts.append([
                Term("gen forward (masked sampler)", rows * seq * g.working_set(seq, act, "cuda"),
                     f"{rows} rows x {seq} tokens"),
                # the sampler's boolean attention mask and its intermediate (a byte per pair of tokens each), and
                # the additive mask in the compute dtype that scaled_dot_product_attention makes of it
                Term("gen attention masks", rows * seq * seq * (act + 2), f"{rows} x {seq} x {seq}"),
                Term("gen step logits", rows * f.image_tokens * f.image_vocab * 4 * 3, "float32"),
            ])
        elif d == "gen":
            seq, rows = f.prompt_tokens + f.image_tokens, n * cfg_rows
            kv = g.layers * 2 * g.kv_heads * g.head_dim * seq * rows * kv_b
            note = f"{n} samples{' x 2 (CFG)' if cfg_rows == 2 else ''} x {seq} tokens"
            rollouts.append([Term("gen KV cache", kv, note),
                             Term("gen step logits", rows * f.image_vocab * 4 * 3, "float32")])
        else:
            seq = f.und_prefix + f.caption_tokens
            kv = g.layers * 2 * g.kv_heads * g.head_dim * seq * n * kv_b
            prefill = n * f.und_prefix * g.working_set(f.und_prefix, act, device)
            rollouts.append([Term("und KV cache", kv, f"{n} samples x {seq} tokens"),
                             Term("und prefill", prefill + n * f.text_vocab * 4 * 3, "one layer's work, logits")])
    phases["rollout"] = gathered + max(rollouts, key=lambda terms: sum(t.bytes for t in terms))
    # ---- scoring: the rewards' and GRPO's no-grad forwards, one direction at a time, in rollout chunks
    scores = []
    for d in cfg.directions:
        side = cfg.side(d)
        rows = _chunk(cfg, side.batch_size * side.group_size, chunk)
        if d == "gen":  # dsr: log p(prompt | image), a captioning-layout forward
            seq, logits = f.und_prefix + f.prompt_tokens, rows * f.prompt_tokens * f.text_vocab * 4 * 2
        else:  # dsr-consensus: log p(image | caption), guided rows
            rows *= cfg_rows
            seq, logits = f.caption_tokens + f.image_tokens, rows * f.image_tokens * f.image_vocab * 4 * 3
        hidden = rows * seq * (g.working_set(seq, act, device) + 2 * g.hidden * act)
        scores.append(Term(f"{d} reward forward", hidden + logits, f"{rows} rows x {seq} tokens, no grad"))
        if f.codec_channels:  # gen: the samples decoded for the reward; und: the input images encoded
            # decoding goes in chunks of codec_batch; the input images of a micro-batch are encoded in one call
            images = min(f.codec_batch, side.batch_size * side.group_size) if d == "gen" else side.batch_size
            coefficient = CODEC_DECODE if d == "gen" else CODEC_ENCODE
            work = coefficient * f.codec_channels * f.image_size**2 * act * images
            scores.append(Term(f"{d} image {'de' if d == 'gen' else 'en'}coding", work,
                               f"{images} images of {f.image_size} px"))
    phases["scoring"] = gathered + [max(scores, key=lambda t: t.bytes)]
    # ---- update: both directions' graphs, then the gradients
    acts, logits, recompute = 0.0, 0.0, 0.0
    for d in cfg.directions if cfg.strategy != "separate" else ["gen"]:
        rows = _update_rows(cfg, d)
        if d == "gen":
            fwd = rows * (cfg_rows if cfg.cfg_policy == "guided" else 1)
            # the logits in the compute dtype, and their float32 copy where that is another dtype (.float() of a
            # float32 tensor is the tensor itself)
            seq = f.prompt_tokens + f.image_tokens
            logits += f.image_tokens * f.image_vocab * (fwd * (act + (4 if act == 2 else 0)) + rows * 4 * 2)
        else:
            fwd, seq = rows, f.und_prefix + f.caption_tokens
            logits += rows * f.caption_tokens * f.text_vocab * (act + (4 if act == 2 else 0) + 4)
        per_layer = g.saved_per_token(seq, act)
        kept = g.layers * g.hidden * act if checkpointing else g.layers * per_layer
        acts += fwd * seq * (kept + 2 * g.hidden * act)
        # checkpointing: the backward recomputes one layer of one forward at a time
        recompute = max(recompute, fwd * seq * per_layer if checkpointing else 0.0)
    acts += recompute
    note = "gradient checkpointing" if checkpointing else "no gradient checkpointing"
    grads = trained * grad_b / shard_g * (2 if engine == "ddp" and processes > 1 else 1)
    phases["update"] = [Term("activations", acts, note), Term("logits", logits, "kept for the backward"),
                        Term("gradients", grads, "LoRA adapters" if lora else "trained parameters")]
    foreach = trained * state_b / shard_g if device != "cpu" else 0  # torch's foreach AdamW: one temporary
    phases["optimizer step"] = [Term("gradients", grads), Term("AdamW temporaries", foreach)]
    settings = {"lora": lora, "gradient_checkpointing": checkpointing,
                "mixed_precision": cfg.mixed_precision, "dtype": f.dtype, "device": device,
                "rollout_chunk": _chunk(cfg, max(cfg.side(d).batch_size * cfg.side(d).group_size
                                                 for d in cfg.directions), chunk)}
    return MemoryPlan(f.backbone, engine, processes, persistent, phases, f, settings)


def what_would_fit(cfg: Any, facts: ModelFacts, limit: float, *, engine: str = "ddp", processes: int = 1,
                   device: str = "cuda", most: int = 3) -> list[str]:
    """Up to ``most`` changes whose plan fits ``limit`` bytes, each as ``what (peak GiB)``, from the fewest levers
    up: gradient checkpointing, LoRA (where the backbone has it), ZeRO-3 on the fewest processes up to 8, the
    largest rollout chunk that fits."""
    import itertools

    levers: list[tuple[str, dict]] = []
    if not cfg.gradient_checkpointing and facts.checkpointing:
        levers.append(("--gradient-checkpointing", {"gradient_checkpointing": True}))
    if facts.lora and not cfg.backbone_options.get("lora"):
        levers.append(("LoRA (--backbone-options '{lora: true}')",
                       {"backbone_options": {**cfg.backbone_options, "lora": True}}))
    levers += [("zero3", {}), ("chunk", {})]
    samples = max(cfg.side(d).batch_size * cfg.side(d).group_size for d in cfg.directions)
    chunks = sorted({max(1, samples // 2**j) for j in range(1, 8)}, reverse=True)

    def peak(changes: dict, launch: dict) -> float:
        changed = dataclasses.replace(cfg, **changes) if changes else cfg
        return plan(changed, facts, **({"engine": engine, "processes": processes, "device": device} | launch)).peak

    def attempt(combo: tuple) -> str | None:
        changes = {k: v for label, c in combo for k, v in c.items() if label not in ("zero3", "chunk")}
        labels = [label for label, _ in combo if label not in ("zero3", "chunk")]
        zero = [{"engine": "zero3", "processes": n} for n in (2, 4, 8) if n >= processes]
        for launch in zero if any(label == "zero3" for label, _ in combo) else [{}]:
            for k in chunks if any(label == "chunk" for label, _ in combo) else [None]:
                extra = launch | ({"chunk": k} if k else {})
                if (p := peak(changes, extra)) <= limit:
                    what = labels + ([f"ZeRO-3 on {launch['processes']} processes"] if launch else [])
                    what += [f"a rollout chunk of {k} samples (rollout_chunk_size: {k})"] if k else []
                    return f"{' + '.join(what)} ({p / GiB:.1f} GiB)"
        return None

    for size in range(1, len(levers) + 1):
        fits = [f for combo in itertools.combinations(levers, size) if (f := attempt(combo))]
        if fits:
            return fits[:most]
    return []


def auto_chunk(cfg: Any, device_bytes: float, *, facts: ModelFacts | None = None, engine: str = "ddp",
               processes: int = 1) -> int | None:
    """The rollout chunk that ``rollout_chunk_size: auto`` starts from on a device of ``device_bytes``: None (the
    whole group batch) when the plan fits as it is, or when no chunk makes it fit (a larger term than the rollout
    decides the peak); else the largest of the group batch halved once, twice, ... (down to one sample) whose plan
    fits ``FIT_MARGIN`` of the device. Out-of-memory errors still halve it during the run."""
    if getattr(cfg, "rollout_chunk_size", "auto") != "auto":
        return None
    limit = device_bytes * FIT_MARGIN
    f = facts or facts_for(cfg, "cuda")
    if plan(cfg, f, engine=engine, processes=processes).peak <= limit:
        return None
    samples = max(cfg.side(d).batch_size * cfg.side(d).group_size for d in cfg.directions)
    size = samples // 2
    while size >= 1:
        if plan(cfg, f, engine=engine, processes=processes, chunk=size).peak <= limit:
            return size
        size //= 2
    return None


def check_fits(memory_plan: MemoryPlan, cfg: Any, device_bytes: float, device_name: str = "the device") -> None:
    """A ``ConfigError`` in one line when the plan's peak passes ``FIT_MARGIN`` of ``device_bytes``, naming what
    would fit; nothing when it fits."""
    limit = device_bytes * FIT_MARGIN
    if memory_plan.peak <= limit:
        return
    fits = what_would_fit(cfg, memory_plan.facts, limit, engine=memory_plan.engine,
                          processes=memory_plan.processes, device=memory_plan.settings["device"])
    advice = ("what would fit: " + "; ".join(fits)) if fits else (
        "nothing tried fits (gradient checkpointing, LoRA, ZeRO-3 on up to 8 processes, a smaller rollout chunk): "
        "use a device with more memory or a smaller batch_size / group_size")
    raise ConfigError(
        f"The memory plan needs {memory_plan.peak / GiB:.1f} GiB per process at its peak ({memory_plan.peak_phase}) "
        f"but {device_name} has {device_bytes / GiB:.1f} GiB ({FIT_MARGIN:.0%} usable); {advice}."
    )


# ------------------------------------------------------------------------------------------ launch and display
def launched() -> tuple[str, int]:
    """(engine, processes) of this launch: ``accelerate launch``'s environment (DeepSpeed's ZeRO stage, FSDP),
    ``WORLD_SIZE`` processes; plain ``suder run``: ddp on 1."""
    from .distributed import launched_engine

    engine = launched_engine()
    if engine == "deepspeed":
        engine = "zero3" if os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2") == "3" else "zero2"
    elif engine == "fsdp":
        engine = "fsdp2"
    return engine, int(os.environ.get("WORLD_SIZE", "1"))


def device_memory() -> tuple[str, float | None]:
    """("cuda:N" and its total bytes) for this process's GPU, or ("cpu", None): no fit check on CPU."""
    import torch

    if torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))
        return f"cuda:{index}", float(torch.cuda.get_device_properties(index).total_memory)
    return "cpu", None


def plan_table(p: MemoryPlan, title: str | None = None):
    """The plan as a rich table: one row per term, one column per phase (GiB per process), totals last."""
    from rich.table import Table

    phases = list(p.phases)
    s = p.settings
    title = title or (
        f"Memory plan: {p.backbone}, {p.engine} x {p.processes}, {s['dtype']}, "
        f"{'LoRA' if s['lora'] else 'full'}, {'' if s['gradient_checkpointing'] else 'no '}gradient checkpointing, "
        f"rollout chunk {s['rollout_chunk']} (GiB per process)"
    )
    table = Table(title=title)
    table.add_column("term")
    for phase in phases:
        table.add_column(phase + (" (peak)" if phase == p.peak_phase else ""), justify="right")
    table.add_column("note")

    def gib(x: float) -> str:
        return f"{x / GiB:.3f}" if x < 10 * GiB else f"{x / GiB:.1f}"

    for t in p.persistent:
        table.add_row(t.name, *[gib(t.bytes)] * len(phases), t.note)
    names = list(dict.fromkeys(t.name for terms in p.phases.values() for t in terms))
    for name in names:
        cells = []
        note = ""
        for phase in phases:
            hit = [t for t in p.phases[phase] if t.name == name]
            cells.append(gib(hit[0].bytes) if hit else "")
            note = note or (hit[0].note if hit else "")
        table.add_row(name, *cells, note)
    table.add_row("[bold]total[/]", *[f"[bold]{gib(p.total(ph))}[/]" for ph in phases], "")
    return table

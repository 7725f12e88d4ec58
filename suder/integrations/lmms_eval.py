"""The lmms-eval model ``suder``: any suder backbone, base or trained, scored on lmms-eval's understanding tasks.

::

    pip install -e ".[lmms-eval]"
    lmms-eval --model suder --model_args backbone=janus-pro,pretrained=runs/janus/final --tasks mme

lmms-eval finds the model through the entry point ``suder = suder.integrations.lmms_eval:manifest`` of its group
``lmms_eval.models`` (pyproject.toml); only lmms-eval imports this module, so ``import suder`` never imports
lmms-eval. ``--model_args`` (``key=value,key=value``):

- ``backbone``: a registered backbone name (``suder backbones``), default ``janus-pro``.
- ``pretrained``: what ``load_backbone(backbone, model=...)`` loads: a Hub id, a ``save_pretrained`` folder, or a
  run's ``final/`` (the separate strategy's ``final/`` holds ``gen/`` and ``und/``: ``und/`` is scored). Default:
  the backbone's own default checkpoint; the toy backbone needs one.
- ``device``, ``dtype``: handed to the backbone's factory when given (lmms-eval's ``--device`` too).
- ``max_new_tokens``, ``temperature``: override the task's ``generation_kwargs`` when given. Otherwise the task's
  values apply, and without those the backbone's caption length and greedy decoding (``temperature=0``).
- lmms-eval's ``--batch_size``: the images one ``sample_text`` (or log-prob) call takes.
- ``seed`` (0): the generator for sampled captions (``temperature > 0``), so a run is reproducible.
- ``use_question`` (true): backbones that caption after an instruction (Janus-Pro's ``caption_instruction``) get the
  task's question (its ``doc_to_text``, with ``<image>`` placeholders removed) in its place; the others caption in
  the format they were trained in and do not see the question (logged once).
- any other key is a backbone option (``load_backbone``'s keyword, e.g. ``caption_instruction``, ``lora``).

Requests map onto the ``UnifiedLMM`` protocol (``suder.protocol``):

- ``generate_until``: ``sample_text`` of the request's one image, cut at the first of the task's ``until`` strings.
- ``loglikelihood``: ``logp_text_given_image`` of the continuation (stripped) as the whole caption, its end-of-text
  token included, summed; ``is_greedy`` is whether the greedy caption equals it. The context is not scored: a
  backbone's caption follows its own fixed prompt, so multiple-choice tasks compare complete captions.
- ``generate_until_multi_round``: not supported (one caption per image); a ``ConfigError`` says so.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms

from ..errors import ConfigError, DataError
from ..registry import load_backbone

logger = logging.getLogger(__name__)

MODEL_NAME = "suder"


def manifest():
    """The entry point of ``lmms_eval.models``: registers ``--model suder`` as this module's ``SuderLMM``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.SuderLMM")


class SuderLMM(lmms):
    """An lmms-eval "simple" model over a suder backbone (module docstring: the arguments and the mapping)."""

    is_simple = True

    def __init__(self, backbone: str = "janus-pro", pretrained: str | None = None, device: str | None = None,
                 dtype: str | None = None, max_new_tokens: int | None = None, temperature: float | None = None,
                 seed: int = 0, use_question: bool = True, batch_size: int | str = 1, **options: Any) -> None:
        super().__init__()
        options.pop("max_batch_size", None)  # lmms-eval hands every model its --max_batch_size; captions batch by size
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.max_new_tokens = None if max_new_tokens is None else _positive_int(max_new_tokens, "max_new_tokens")
        self.temperature = None if temperature is None else float(temperature)
        self.seed = int(seed)
        self.use_question = _flag(use_question, "use_question")
        if pretrained is None and backbone == "toy":
            raise ConfigError("Pass pretrained=PATH in --model_args (a folder from `suder pretrain` or `suder run`'s "
                              "final/) for the toy backbone.")
        load = dict(options)
        if pretrained is not None:
            load["model"] = und_folder(str(pretrained))
        load.update({k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None})
        self.model = load_backbone(str(backbone), **load)
        self.model.eval()
        self.backbone = str(backbone)
        self._question_noted = False

    # ------------------------------------------------------------------ lmms-eval's request types
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """One caption per request: ``args = (context, gen_kwargs, doc_to_visual, doc_id, task, split)``."""
        answers = [""] * len(requests)
        keyed = []
        for i, request in enumerate(requests):
            context, gen_kwargs = request.args[0], dict(request.args[1] or {})
            temperature, max_tokens = self._decoding(gen_kwargs)
            keyed.append(((self._question(context), temperature, max_tokens), i))
        for (question, temperature, max_tokens), rows in _groups(keyed, self.batch_size):
            images = [self._image(requests[i]) for i in rows]
            options = {} if max_tokens is None else {"max_tokens": max_tokens}
            with self._asking(question):
                texts = self.model.sample_text(images, temperature=temperature, generator=self._generator(),
                                               **options).texts
            for i, text in zip(rows, texts, strict=True):
                answers[i] = _cut(text, _stops(requests[i].args[1]))
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """``args = (context, continuation, doc_to_visual, doc_id, task, split)``: log p(continuation as the whole
        caption | image), summed over its tokens and end-of-text, and whether greedy decoding writes it; each
        ``(log_prob, is_greedy)`` pair is the ``.text`` of a ``GenerationResult``.

        Why the wrapper: lmms-eval 0.7.3's evaluator passes every response through ``unwrap_generation_output``,
        which turns a plain ``(float, bool)`` tuple into its ``str`` (multiple-choice scoring then fails with "too
        many values to unpack") but hands a ``GenerationResult``'s ``.text`` on as it is. Return plain tuples
        again once lmms-eval keeps them.
        """
        results: list[tuple[float, bool]] = [(float("-inf"), False)] * len(requests)
        greedy: dict[tuple, str] = {}  # (question, task, split, doc_id) -> greedy caption: once per document
        keyed = [((self._question(r.args[0]),), i) for i, r in enumerate(requests)]
        for (question,), rows in _groups(keyed, self.batch_size):
            images = [self._image(requests[i]) for i in rows]
            texts = [str(requests[i].args[1]).strip() for i in rows]
            docs = [(question, *requests[i].args[3:6]) for i in rows]
            new = {doc: image for doc, image in zip(docs, images, strict=True) if doc not in greedy}
            with self._asking(question), torch.no_grad():
                scores = self.model.logp_text_given_image(texts, images).sum().float().tolist()
                if new:
                    captions = self.model.sample_text(list(new.values()), temperature=0.0).texts
                    greedy.update(zip(new, (c.strip() for c in captions), strict=True))
            for i, score, text, doc in zip(rows, scores, texts, docs, strict=True):
                results[i] = (float(score), greedy[doc] == text)
        return [GenerationResult(text=r) for r in results]

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise ConfigError("The suder model answers one caption per image, not multi-round conversations; run "
                          "tasks whose output_type is generate_until, loglikelihood or multiple_choice.")

    # ------------------------------------------------------------------ helpers
    def _image(self, request: Instance) -> Any:
        """The request's one image, RGB (``doc_to_visual`` of its document)."""
        doc_to_visual, doc_id, task, split = request.args[2:6]
        visuals = [v for v in (doc_to_visual(self.task_dict[task][split][doc_id]) or []) if v is not None]
        if len(visuals) != 1 or not hasattr(visuals[0], "convert"):
            kinds = ", ".join(type(v).__name__ for v in visuals) or "none"
            raise DataError(f"Task '{task}' gives document {doc_id} {len(visuals)} visual(s) ({kinds}), but a suder "
                            "backbone captions exactly one image; pick a single-image task.")
        return visuals[0].convert("RGB")

    def _decoding(self, gen_kwargs: dict[str, Any]) -> tuple[float, int | None]:
        """(temperature, caption length) of a request: model_args first, then the task's generation_kwargs."""
        temperature = self.temperature
        if temperature is None:
            sample = _flag(gen_kwargs.get("do_sample", False), "do_sample")
            temperature = float(gen_kwargs.get("temperature") or 0.0) if sample else 0.0
        length = self.max_new_tokens or gen_kwargs.get("max_new_tokens")
        return temperature, None if length is None else int(length)

    def _question(self, context: Any) -> str | None:
        """The instruction this request captions under (None: the backbone's own)."""
        if not self.use_question or not hasattr(self.model, "caption_instruction"):
            if not self._question_noted and self.use_question and str(context or "").strip():
                logger.info("The %s backbone captions without an instruction; the task's questions are not seen.",
                            self.backbone)
                self._question_noted = True
            return None
        text = " ".join(str(context or "").replace("<image>", " ").split())
        return text or None

    @contextlib.contextmanager
    def _asking(self, question: str | None) -> Iterator[None]:
        if question is None:
            yield
            return
        saved = self.model.caption_instruction
        self.model.caption_instruction = question
        try:
            yield
        finally:
            self.model.caption_instruction = saved

    def _generator(self) -> torch.Generator:
        if not hasattr(self, "_rng"):
            self._rng = torch.Generator().manual_seed(self.seed)
        return self._rng


def und_folder(pretrained: str) -> str:
    """The folder that holds the captioning model: ``pretrained`` itself, or its ``und/`` when it is the separate
    strategy's ``final/`` (one model per direction, in ``gen/`` and ``und/``)."""
    path = os.path.expanduser(pretrained)
    if os.path.isdir(os.path.join(path, "und")) and os.path.isdir(os.path.join(path, "gen")):
        return os.path.join(path, "und")
    return pretrained


def _groups(keyed: Sequence[tuple[tuple, int]], size: int) -> Iterator[tuple[tuple, list[int]]]:
    """Request indices that share a key, in chunks of at most ``size``, in first-seen order of the keys."""
    by_key: dict[tuple, list[int]] = {}
    for key, i in keyed:
        by_key.setdefault(key, []).append(i)
    for key, rows in by_key.items():
        for start in range(0, len(rows), size):
            yield key, rows[start : start + size]


def _stops(gen_kwargs: Any) -> list[str]:
    until = (gen_kwargs or {}).get("until") or []
    return [s for s in ([until] if isinstance(until, str) else until) if s]


def _cut(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first of the stop strings (lmms-eval's ``until``)."""
    for stop in stops:
        text = text.split(stop, 1)[0]
    return text


def _positive_int(value: Any, name: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise ConfigError(f"{name} must be a whole number of at least 1, got {value!r}.")
    return number


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", "none", ""):
        return False
    raise ConfigError(f"{name}={value!r} must be true or false.")

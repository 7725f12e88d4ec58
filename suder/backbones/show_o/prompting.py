"""Show-o's universal prompting: token ids, sequence layouts and omni-attention masks (pure functions).

Reference: Show-o (arXiv:2408.12528) section 3.2 "Unified Prompting" and "Omni-Attention Mechanism";
the exact layouts are those of showlab/Show-o's ``training/prompting_utils.py``. Token ids come from the model's
config and the tokenizer (``ShowoTokens``), so a tiny test vocabulary uses the same code with shifted ids.

Sequences (released ids in brackets; ``M = max_text_len`` = 128, ``N`` image tokens):

- text-to-image: ``[pad...] <|t2i|> bos text eos <|soi|> image(N) <|eoi|>``; the first M + 1 = 129 slots hold
  the left-padded text block (truncated to M then eos when longer). Unconditional: the prompt ``""``.
- understanding: ``<|mmu|> <|soi|> image(N) <|eoi|> bos [question] caption eos``, right-padded with pad; with
  no question this is showlab's captioning (``mmu``) training format.

Masks are boolean (B, 1, L, L), True where a row may attend:

- ``t2i_attention_mask`` (showlab's ``create_attention_mask_predict_next`` with ``rm_pad_in_image``): text
  rows causal; rows soi..eoi see every column; rows after the last pad see no column up to the last pad; rows
  from soi on see no pad. Pad rows stay causal among the pads, so no row is fully blocked.
- ``mmu_attention_mask`` (showlab's ``create_attention_mask_for_mmu``): causal, plus columns 0..eoi open to
  all rows. showlab takes the eoi position from the first row; we take each row's own (identical for our
  batches).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

SPECIAL_TOKENS = (
    "<|soi|>",
    "<|eoi|>",
    "<|sov|>",
    "<|eov|>",
    "<|t2i|>",
    "<|mmu|>",
    "<|t2v|>",
    "<|v2v|>",
    "<|lvg|>",
)
PAD_TOKEN = "[PAD]"


@dataclass(frozen=True)
class ShowoTokens:
    """Every id a Show-o sequence uses. Released values: pad 50295, soi 50296, eoi 50297, t2i 50300, mmu
    50301, image_offset 50305, mask 58497, bos = eos = 50256 (phi-1_5's ``<|endoftext|>``)."""

    bos: int
    eos: int
    pad: int
    soi: int
    eoi: int
    t2i: int
    mmu: int
    image_offset: int
    mask: int
    codebook_size: int
    text_vocab_size: int  # ids [0, text_vocab_size) are text: what captions are sampled from
    max_text_len: int
    num_image_tokens: int

    @classmethod
    def from_config(cls, config: Any, bos: int, eos: int) -> ShowoTokens:
        base = config.llm_vocab_size
        ids = {name: base + 1 + i for i, name in enumerate(("soi", "eoi", "sov", "eov", "t2i", "mmu"))}
        return cls(
            bos=bos,
            eos=eos,
            pad=base,
            soi=ids["soi"],
            eoi=ids["eoi"],
            t2i=ids["t2i"],
            mmu=ids["mmu"],
            image_offset=base + config.num_new_special_tokens,
            mask=config.vocab_size - 1,
            codebook_size=config.codebook_size,
            text_vocab_size=base,
            max_text_len=config.max_text_len,
            num_image_tokens=config.num_vq_tokens,
        )


def add_special_tokens(tokenizer: Any, llm_vocab_size: int) -> Any:
    """Add ``[PAD]`` then the nine task/boundary tokens, as showlab's ``UniversalPrompting`` does, and check
    that they land on ids ``llm_vocab_size .. llm_vocab_size + 9``. Idempotent (a saved tokenizer already has
    them)."""
    if PAD_TOKEN not in tokenizer.get_vocab():
        if len(tokenizer) != llm_vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model expects {llm_vocab_size}")
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        tokenizer.add_tokens(list(SPECIAL_TOKENS))
    else:
        tokenizer.pad_token = PAD_TOKEN
    got = tokenizer.convert_tokens_to_ids([PAD_TOKEN, *SPECIAL_TOKENS])
    want = list(range(llm_vocab_size, llm_vocab_size + 1 + len(SPECIAL_TOKENS)))
    if got != want:
        raise ValueError(f"Show-o special tokens got ids {got}, expected {want}")
    return tokenizer


# --------------------------------------------------------------------------------------------- sequences
def t2i_text_block(text_ids: Sequence[int], tok: ShowoTokens) -> list[int]:
    """``<|t2i|> bos text eos`` left-padded to ``max_text_len + 1`` slots (truncated to M, then eos, if
    longer)."""
    ids = list(text_ids)
    if not ids or ids[0] != tok.bos:
        ids = [tok.bos, *ids]
    block = [tok.t2i, *ids, tok.eos]
    width = tok.max_text_len + 1
    if len(block) > width:
        block = block[: width - 1] + [tok.eos]
    return [tok.pad] * (width - len(block)) + block


def t2i_sequences(text_ids: Sequence[Sequence[int]], image_ids: torch.Tensor, tok: ShowoTokens) -> torch.Tensor:
    """(B, M + 1 + 1 + N + 1) ids: text blocks, soi, ``image_ids`` (B, N) (already offset or mask ids),
    eoi."""
    blocks = torch.tensor([t2i_text_block(t, tok) for t in text_ids], dtype=torch.long, device=image_ids.device)
    b = blocks.shape[0]
    soi = torch.full((b, 1), tok.soi, dtype=torch.long, device=image_ids.device)
    eoi = torch.full((b, 1), tok.eoi, dtype=torch.long, device=image_ids.device)
    return torch.cat([blocks, soi, image_ids, eoi], 1)


def mmu_prefix(image_ids: torch.Tensor, tok: ShowoTokens, question_ids: Sequence[int] = ()) -> torch.Tensor:
    """(B, 4 + N + Q) ids ``<|mmu|> <|soi|> image <|eoi|> bos question``; ``image_ids`` (B, N) already
    offset."""
    b, device = image_ids.shape[0], image_ids.device
    head = torch.tensor([tok.mmu, tok.soi], device=device).expand(b, 2)
    tail = torch.tensor([tok.eoi, tok.bos, *question_ids], dtype=torch.long, device=device).expand(b, -1)
    return torch.cat([head, image_ids, tail], 1)


# --------------------------------------------------------------------------------------------- masks
def _causal(length: int, device: torch.device) -> torch.Tensor:
    idx = torch.arange(length, device=device)
    return idx[:, None] >= idx[None, :]


def t2i_attention_mask(ids: torch.Tensor, tok: ShowoTokens, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L) t2i ids -> (B, 1, L, L) bool omni-attention mask (see the module docstring).

    ``hidden``: optional (B, L) bool, positions no other row may see (dropped prompt tokens, which carry the pad
    id but sit inside the text: the pad rule above assumes left padding, so they are hidden here instead).
    """
    b, length = ids.shape
    idx = torch.arange(length, device=ids.device)
    # the image segment runs from soi through eoi inclusive (cumulative counts of the two markers)
    soi_seen = (ids == tok.soi).long().cumsum(1)
    eoi_before = (ids == tok.eoi).long().cumsum(1) - (ids == tok.eoi).long()
    in_image = (soi_seen - eoi_before) > 0  # (B, L)
    allowed = _causal(length, ids.device).expand(b, length, length) | in_image[:, :, None]
    is_pad = ids == tok.pad
    last_pad = torch.where(is_pad, idx, torch.full_like(idx, -1)).amax(1)  # (B,), -1 without pads
    after_pads = idx[None, :] > last_pad[:, None]  # rows past the last pad ...
    up_to_last_pad = idx[None, :] <= last_pad[:, None]  # ... lose these columns
    allowed = allowed & ~(after_pads[:, :, None] & up_to_last_pad[:, None, :])
    from_soi = soi_seen > 0  # rows from soi on lose every pad column
    allowed = allowed & ~(from_soi[:, :, None] & is_pad[:, None, :])
    if hidden is not None:
        others = ~torch.eye(length, dtype=torch.bool, device=ids.device)
        allowed = allowed & ~(hidden[:, None, :] & others)
    return allowed[:, None]


def mmu_attention_mask(ids: torch.Tensor, tok: ShowoTokens) -> torch.Tensor:
    """(B, L) understanding ids -> (B, 1, L, L) bool: causal, plus columns 0..eoi visible to every row."""
    b, length = ids.shape
    idx = torch.arange(length, device=ids.device)
    eoi_pos = (ids == tok.eoi).long().argmax(1)  # first eoi of each row
    prefix = idx[None, :] <= eoi_pos[:, None]  # (B, L) columns
    allowed = _causal(length, ids.device).expand(b, length, length) | prefix[:, None, :]
    return allowed[:, None]

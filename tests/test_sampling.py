"""suder.sampling: the padders and the caption loop every backbone shares (worked examples by hand)."""

from __future__ import annotations

import torch

from suder.sampling import caption_loop, left_pad, right_pad


def test_left_and_right_padding():
    ids, mask = left_pad([[5, 6], [7, 8, 9]], pad=0)
    assert ids.tolist() == [[0, 5, 6], [7, 8, 9]] and mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert mask.dtype == torch.long
    tokens, tmask = right_pad([[5, 6], [7, 8, 9]], pad=0)
    assert tokens.tolist() == [[5, 6, 0], [7, 8, 9]] and tmask.tolist() == [[True, True, False], [True, True, True]]


def test_caption_loop_stops_each_row_at_eos_and_keeps_it():
    """Greedy over a scripted model: row 0 says 3 then EOS (2); row 1 says 4, 4, 4 until the limit. The EOS is a
    sampled (alive) token; after it the row is padding (pad 0, log-prob 0) while the other row goes on."""
    script = [[3, 4], [2, 4], [3, 4], [3, 4]]  # the arg-max token of each row at each step
    fed = []

    def logits_for(t):
        return torch.nn.functional.one_hot(torch.tensor(script[t]), 6).float() * 5.0

    def step(token):
        fed.append(token[:, 0].tolist())
        return logits_for(len(fed))

    def draw(logits, temperature, generator):
        choice = logits.argmax(-1)
        return choice, torch.log_softmax(logits, -1).gather(-1, choice[:, None]).squeeze(-1)

    tokens, logps, alive = caption_loop(logits_for(0), step, draw, limit=4, eos=2, pad=0, temperature=0.0,
                                        generator=None)
    assert tokens.tolist() == [[3, 2, 0, 0], [4, 4, 4, 4]]
    assert alive.tolist() == [[True, True, False, False], [True] * 4]
    assert bool((logps[~alive] == 0).all()) and bool((logps[alive] < 0).all())
    assert fed == [[3, 4], [2, 4], [0, 4]]  # the last step is not fed (nothing more to draw)


def test_caption_loop_maps_restricted_choices_and_stops_when_all_rows_end():
    vocab = torch.tensor([9, 2])  # a restricted set: choice 1 is the EOS id 2
    calls = []

    def step(token):
        calls.append(token)
        return torch.tensor([[0.0, 5.0], [0.0, 5.0]])

    tokens, _, alive = caption_loop(torch.tensor([[5.0, 0.0], [0.0, 5.0]]), step,
                                    lambda lg, t, g: (lg.argmax(-1), lg.log_softmax(-1).max(-1).values),
                                    limit=8, eos=2, pad=0, temperature=0.0, generator=None,
                                    token_of=lambda c: vocab[c])
    assert tokens.tolist()[0][:2] == [9, 2] and tokens.tolist()[1][:2] == [2, 0]
    assert len(calls) == 1 and alive.sum(-1).tolist() == [2, 1]  # both rows ended: no further model call

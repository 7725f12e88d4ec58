"""Show-o's estimator study (``show_o_estimators.estimator_study``) on a tiny untrained Show-o. Not part of the
suite: ``python -m pytest research/code``."""

from __future__ import annotations

import show_o_estimators
from test_pretrain import TINY_BUILD  # tests/ is on sys.path (conftest.py)

from suder.backbones.show_o import shapes_world


def test_estimator_study_scores_every_estimator_and_normalisation(monkeypatch):
    """Each understanding reward is computed with its estimator's options (the perturbed ones seeded), each
    generation reward under its caption normalisation, which is restored afterwards."""
    from suder.backbones.show_o.backbone import ShowOBackbone

    model = shapes_world.build_shapes_base(**TINY_BUILD)
    seen_options, seen_vocabs = [], []
    image_logp, text_logp = ShowOBackbone.logp_image_given_text, ShowOBackbone.logp_text_given_image

    def spy_image(self, images, texts, **options):
        seen_options.append(options)
        return image_logp(self, images, texts, **options)

    def spy_text(self, texts, images, **options):
        seen_vocabs.append(self.settings.caption_logp_vocab)
        return text_logp(self, texts, images, **options)

    monkeypatch.setattr(ShowOBackbone, "logp_image_given_text", spy_image)
    monkeypatch.setattr(ShowOBackbone, "logp_text_given_image", spy_text)
    out = show_o_estimators.estimator_study(model, num=4, group_size=2, seed=5)
    assert set(out["gen"]) == {"caption_logp_vocab text", "caption_logp_vocab full"}
    assert len(out["und"]) == 2 * len(show_o_estimators.ESTIMATORS)
    assert all(row["groups"] == 4 for d in out.values() for row in d.values())
    scored = [o for o in seen_options if o.get("policy") == "cond"]  # the sampler's own calls are "guided"
    for opts in show_o_estimators.ESTIMATORS.values():
        match = [o for o in scored if {k: o.get(k) for k in ("remask_ratio", "prompt_drop") if k in o} == opts]
        assert len(match) == 2 and all(not opts or o["remask_seed"] == 5 for o in match)  # dsr, dsr-consensus
    assert {"text", "full"} <= set(seen_vocabs) and model.settings.caption_logp_vocab == "text"

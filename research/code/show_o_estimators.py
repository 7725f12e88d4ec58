"""Show-o's estimator study: which image log-prob estimator and caption normalisation make the dual self-rewards
agree with the ShapesWorld judge (research, not installed; moved out of ``suder.backbones.show_o.shapes_world``).

Its conclusion is written down in docs/backbones/show-o.md ("What the four methods compute"): the estimator and
normalisation suder uses by default. Run from the repository root with ``PYTHONPATH=research/code``, e.g.
``estimator_study(load_backbone("show-o", model=BASE), num=64, seed=1000)``.
"""

from __future__ import annotations

from typing import Any

from agreement import reward_agreement

from suder.rewards import RewardContext, dsr_generation

# The image log-prob estimators compared (docs/backbones/show-o.md, "What the four methods compute").
ESTIMATORS: dict[str, dict[str, Any]] = {
    "all masked": {},
    "re-masked image (remask_ratio 0.5)": {"remask_ratio": 0.5},
    "dropped prompt tokens (prompt_drop 0.15)": {"prompt_drop": 0.15},
}


def estimator_study(model: Any, *, num: int = 64, group_size: int = 4, seed: int = 1000) -> dict[str, Any]:
    """Reward-judge agreement (``agreement.reward_agreement``) of Show-o's dual self-rewards on held-out
    ShapesWorld prompts and scenes: the generation reward log p(prompt | image) under each caption normalisation
    (``caption_logp_vocab`` text / full), and the understanding rewards (``dsr``: mean log p(image | caption);
    ``dsr-consensus``: its sum plus the caption's own sum log-prob) under each image estimator (``ESTIMATORS``;
    the perturbed ones with one fixed seed per batch)."""
    ctx = RewardContext(model, reference=model)

    def caption_reward(vocab: str):
        def score(samples):
            saved, model.settings.caption_logp_vocab = model.settings.caption_logp_vocab, vocab
            try:
                return dsr_generation(ctx, samples)
            finally:
                model.settings.caption_logp_vocab = saved
        return score

    def image_reward(options: dict[str, Any], consensus: bool):
        def score(samples):
            extra = {**options, "remask_seed": seed} if options else {}
            lp = model.logp_image_given_text(samples.images, samples, policy="cond", **extra)
            if not consensus:
                return lp.mean()
            return lp.sum() + model.logp_text_given_image(samples, samples.images).sum()
        return score

    gen = {f"caption_logp_vocab {v}": caption_reward(v) for v in ("text", "full")}
    und = {f"{reward}, {name}": image_reward(opts, reward == "dsr-consensus")
           for reward in ("dsr", "dsr-consensus") for name, opts in ESTIMATORS.items()}
    return reward_agreement(model, gen, und, num=num, group_size=group_size, seed=seed)

"""The built-in backbones pass the public conformance kit (``suder.testing``), as a third-party backbone would.

Each class runs every check of ``suder.testing.BackboneConformance`` (group layout, left padding, sampled vs
teacher-forced log-probs under both CFG policies, greedy temperature 0, seeding, save/load, trainable parameters,
and 2 trainer steps in every strategy with both algorithms) on a tiny model of the backbone.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from suder.testing import BackboneConformance


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class TestToyConformance(BackboneConformance):
    backbone_name = "toy"
    prompts = ("a red circle", "two blue squares to the left of a green triangle")
    train_options = {"eval_num": 4}

    def make_backbone(self, tiny_toy_path):
        from suder import load_backbone

        return load_backbone("toy", model=tiny_toy_path)

    def make_images(self, n):
        from suder.worlds import shapes

        return [shapes.render(s) for s in shapes.sample_scenes(n, seed=0)]


class TestJanusProConformance(BackboneConformance):
    backbone_name = "janus-pro"
    prompts = ("a red circle", "a green triangle left of a yellow star")
    guidance_scale = 5.0
    load_options = {"dtype": "float32", "device": "cpu"}

    def make_backbone(self):
        from janus_tiny import tiny_backbone

        return tiny_backbone(max_caption_tokens=8)

    def make_images(self, n):
        from janus_tiny import random_images

        return random_images(n)


class TestShowOConformance(BackboneConformance):
    backbone_name = "show-o"
    prompts = ("a red square", "two green triangles left of a photo of a cat")
    guidance_scale = 1.5
    unguided_scale = 0.0  # Show-o's logits are (1 + g) cond - g uncond
    load_options = {"device": "cpu"}

    def make_backbone(self):
        from show_o_tiny import tiny_backbone

        return tiny_backbone()

    def make_images(self, n):
        from show_o_tiny import tiny_images

        return tiny_images(n)


# ------------------------------------------------------------------------------------------ the kit can fail
TOY_PROMPTS = list(TestToyConformance.prompts)


@pytest.fixture
def toy(tiny_toy_path):
    from suder import load_backbone

    return load_backbone("toy", model=tiny_toy_path).eval()


@pytest.fixture
def toy_images():
    return TestToyConformance().make_images(2)


def test_group_major_rows_fail_the_layout_check(toy, toy_images):
    """Rows laid out group-major ([a, b, a, b]) under input-major prompts: each row is scored with the wrong prompt."""
    from suder.testing import check_group_layout

    sample = toy.sample_image

    def group_major(prompts, *, num_samples=1, **kw):
        s = sample(prompts, num_samples=num_samples, **kw)
        order = torch.arange(len(s)).view(len(prompts), num_samples).T.reshape(-1)
        return type(s)(s.prompts, s.tokens[order], s.logps[order], num_samples, s.guidance_scale, s.temperature)

    toy.sample_image = group_major
    with pytest.raises(AssertionError, match="scored alone"):
        check_group_layout(toy, TOY_PROMPTS, toy_images, guidance_scale=3.0)


def test_group_major_captions_fail_the_layout_check(toy, toy_images):
    from suder.testing import check_group_layout

    sample = toy.sample_text

    def group_major(images, *, num_samples=1, **kw):
        t = sample(images, num_samples=num_samples, **kw)
        rows = t.select(torch.arange(len(t)).view(len(images), num_samples).T.reshape(-1))
        rows.num_samples = num_samples
        return rows

    toy.sample_text = group_major
    with pytest.raises(AssertionError, match=r"sample_text row \d \(image \d\) scored alone"):
        check_group_layout(toy, TOY_PROMPTS, toy_images, guidance_scale=3.0)


def test_padding_dependent_scores_fail_the_padding_check(toy, toy_images):
    from suder.testing import check_left_padding

    score = toy.logp_image_given_text

    def padded(images, texts, **kw):  # a backbone whose pads leak into the scores
        lp = score(images, texts, **kw)
        lp.values = lp.values + 1e-3 * (len(texts) - 1)
        return lp

    toy.logp_image_given_text = padded
    with pytest.raises(AssertionError, match="in a batch vs alone"):
        check_left_padding(toy, TOY_PROMPTS, toy_images)


def test_untempered_scores_fail_the_logps_check(toy, toy_images):
    from suder.testing import check_sampled_logps_match_teacher_forced

    score = toy.logp_text_given_image
    toy.logp_text_given_image = lambda texts, images, **kw: score(texts, images)  # ignores temperature
    with pytest.raises(AssertionError, match=r"sample_text\(temperature=0.7\).logps vs teacher-forced"):
        check_sampled_logps_match_teacher_forced(toy, TOY_PROMPTS, toy_images, guidance_scale=3.0)


def test_ignored_guidance_fails_the_logps_check(toy, toy_images):
    from suder.testing import check_sampled_logps_match_teacher_forced

    score = toy.logp_image_given_text
    toy.logp_image_given_text = lambda images, texts, **kw: score(images, texts, **(kw | {"policy": "cond"}))
    with pytest.raises(AssertionError, match="policy='guided'"):
        check_sampled_logps_match_teacher_forced(toy, TOY_PROMPTS, toy_images, guidance_scale=3.0)


def test_an_unused_generator_fails_the_seeding_check(toy, toy_images):
    from suder.testing import check_generator_reproduces

    sample_image, sample_text = toy.sample_image, toy.sample_text
    toy.sample_image = lambda prompts, generator=None, **kw: sample_image(prompts, **kw)
    toy.sample_text = lambda images, generator=None, **kw: sample_text(images, **kw)
    with pytest.raises(AssertionError, match="same generator seed"):
        check_generator_reproduces(toy, TOY_PROMPTS, toy_images)


def test_a_parameter_without_gradient_fails_the_trainable_check(toy, toy_images):
    from suder.testing import check_trainable_parameters

    toy.unused = torch.nn.Linear(2, 2)
    toy.trainable_parameters = lambda direction: list(toy.lm.parameters()) + list(toy.unused.parameters())
    with pytest.raises(AssertionError, match="no gradient of the gen log-prob reaches 2 of"):
        check_trainable_parameters(toy, TOY_PROMPTS, toy_images)


def test_a_lossy_save_fails_the_round_trip(toy, toy_images, tmp_path):
    from suder.testing import check_save_load_round_trip

    save = toy.save_pretrained

    def lossy(path):
        with torch.no_grad():
            toy.lm.lm_head.weight.add_(1e-2)  # what is saved is not the model that was scored
        save(path)

    toy.save_pretrained = lossy
    with pytest.raises(AssertionError, match="after save/load"):
        check_save_load_round_trip(toy, "toy", tmp_path / "m", TOY_PROMPTS, toy_images)


def test_the_trainable_check_leaves_the_model_as_it_found_it(toy, toy_images):
    from suder.testing import check_trainable_parameters

    toy.lm.model.embed_tokens.weight.requires_grad_(False)  # a frozen part must stay frozen
    toy.eval()
    toy.trainable_parameters = lambda direction: [p for p in toy.lm.parameters() if p.requires_grad]
    check_trainable_parameters(toy, TOY_PROMPTS, toy_images)
    assert not toy.lm.model.embed_tokens.weight.requires_grad and not toy.training
    assert all(p.grad is None for p in toy.parameters())


# ------------------------------------------------------------------------------------------ ShapesWorld recipes
TINY_RECIPE_OPTIONS = {
    "toy": dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
    "show-o": dict(
        llm=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
        vq=dict(ch=32, encoder_ch_mult=(1, 1, 1, 1), encoder_num_res_blocks=(1, 1, 1, 1),
                decoder_ch_mult=(1, 1, 1, 1), decoder_num_res_blocks=(1, 1, 1, 1)),
        tokenizer_steps=2,
        tokenizer_batch_size=4,
    ),
    "janus-pro": dict(
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2),
        vision=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2.0),
        vq=dict(base_channels=32, latent_channels=32, channel_multiplier=[1, 1, 1, 1], num_res_blocks=0,
                num_embeddings=64),
        tokenizer_steps=2,
        tokenizer_batch_size=4,
    ),
}


@pytest.mark.parametrize("name", sorted(TINY_RECIPE_OPTIONS))
def test_builtin_recipes_pass_the_recipe_check(name, tmp_path):
    """Each built-in backbone declares its ShapesWorld default through the public registration and passes the
    same check a third-party recipe runs: build tiny, pre-train 2 steps, save, reload, sample both ways."""
    from suder import registry
    from suder.testing import check_shapes_recipe

    assert registry.get_backbone_spec(name).shapes_recipe is not None  # declared where it is registered
    check_shapes_recipe(name, tmp_path / "base", **TINY_RECIPE_OPTIONS[name])


def _recipe_plugin(name: str, recipe, load=None):
    """A third-party backbone ``name`` (a small toy under its own name) registering ``recipe`` through the hook."""
    import types

    from suder import hookimpl, plugins
    from suder.backbones.toy import ToyConfig, ToyUnifiedLM

    backbone_cls = type("MiniBackbone", (ToyUnifiedLM,), {"name": name})

    def build(model=None, **config):
        if model is not None and load is None:
            return backbone_cls.from_pretrained(model)
        return (load or backbone_cls)(ToyConfig(**{**TINY_RECIPE_OPTIONS["toy"], **config}))

    mod = types.ModuleType(f"suder_{name}")

    @hookimpl
    def register_backbones(register):
        register(name, build, summary="a third-party backbone with a ShapesWorld recipe", shapes_recipe=recipe)

    mod.register_backbones = register_backbones
    plugins.register_plugin(mod, name=name)


@pytest.fixture
def fresh_plugins():
    from suder import plugins

    plugins.reset()
    yield
    plugins.reset()


def test_a_plugin_recipe_with_its_own_preset_file_is_the_embedded_default(tmp_path, fresh_plugins, monkeypatch):
    """A third party's recipe, with a preset YAML file it ships, is what `suder run --backbone NAME` uses: the
    config takes the file's values on a ShapesWorld run, ensure_base names the cache after its version and seed,
    and the recipe passes the check."""
    import importlib

    import suder
    from suder.config import resolve
    from suder.errors import ConfigError
    from suder.testing import check_shapes_recipe

    preset = tmp_path / "mini.yaml"
    preset.write_text("lr: 0.000123\ngen:\n  group_size: 3\n")
    recipe = suder.ShapesRecipe(version="mini-v2", pretrain=dict(steps=4, seed=5, batch_size=2), preset=preset)
    _recipe_plugin("mini", recipe)
    pretrain_mod = importlib.import_module("suder.pretrain")
    assert pretrain_mod.shapes_recipe("mini") is recipe and recipe.preset == str(preset)
    cfg = resolve(backbone="mini")
    assert cfg.preset == str(preset) and cfg.lr == 0.000123 and cfg.gen.group_size == 3
    assert cfg.sources["lr"] == "preset"
    assert resolve(backbone="mini", strategy="gen", prompts=str(tmp_path / "p.txt")).preset is None  # real data

    calls = []

    def fake(model, *, out, steps, seed, callback):
        calls.append((model, steps, seed))
        Path(out).mkdir(parents=True)
        return pretrain_mod.PretrainResult(None, out, 1.0, [0.5], 0.5)

    with monkeypatch.context() as m:
        m.setattr(pretrain_mod, "pretrain", fake)
        assert pretrain_mod.ensure_base("mini").name == "mini-base-mini-v2-steps4-seed5" and calls == [("mini", 4, 5)]
    check_shapes_recipe("mini", tmp_path / "base")
    preset.write_text("lr: 0.000123\ngroup_sise: 3\n")  # a misspelt setting: the check reads the preset first
    with pytest.raises(ConfigError, match="group_sise"):
        check_shapes_recipe("mini", tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_a_base_that_does_not_load_back_fails_the_recipe_check(tmp_path, fresh_plugins):
    """A factory that ignores ``model=`` (a fresh random model instead of the saved base) fails the reload."""
    import suder
    from suder.backbones.toy import ToyUnifiedLM
    from suder.testing import check_shapes_recipe

    fresh = type("Fresh", (ToyUnifiedLM,), {"name": "fresh"})
    _recipe_plugin("fresh", lambda: suder.ShapesRecipe(version="v1"), load=fresh)
    with pytest.raises(AssertionError, match="of the loaded base"):
        check_shapes_recipe("fresh", tmp_path / "base")


def test_a_recipe_is_checked_where_it_is_declared(fresh_plugins):
    import suder
    from suder.errors import BackboneError
    from suder.pretrain import shapes_recipe

    with pytest.raises(BackboneError, match="unknown key 'step'.*did you mean 'steps'"):
        suder.ShapesRecipe(pretrain=dict(step=3))
    with pytest.raises(BackboneError, match="names the cache folder"):
        suder.ShapesRecipe(version="v1/../x")
    with pytest.raises(BackboneError, match="name a .yaml or .yml file"):
        suder.ShapesRecipe(preset="/etc/presets/mine")
    _recipe_plugin("wrong", lambda: {"version": "v1"})
    with pytest.raises(BackboneError, match="gives dict, not a suder.ShapesRecipe"):
        shapes_recipe("wrong")

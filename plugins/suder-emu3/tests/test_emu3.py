"""The ``emu3`` plugin on a tiny random Emu3 (CPU, offline): the suder conformance kit, the sequence layout of
BAAI's processor, top-k, the saved folder, registration and the one-line error without weights."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# CI installs the plugin (.ci/run, where a failed install stops the run); elsewhere these tests skip without it
pytest.importorskip("suder_emu3", reason="the emu3 plugin is not installed: pip install -e plugins/suder-emu3")
from emu3_tiny import CODES, IMAGE_SIZE, random_images, tiny_backbone

from suder.testing import BackboneConformance

HERE = Path(__file__).resolve().parent
PROMPTS = ["a red circle", "a green triangle left of a yellow star"]


class TestEmu3Conformance(BackboneConformance):
    backbone_name = "emu3"
    prompts = tuple(PROMPTS)
    guidance_scale = 3.0
    load_options = {"device": "cpu"}

    def make_backbone(self):
        return tiny_backbone()

    def make_images(self, n):
        return random_images(n)


def test_generation_prompt_is_baais_layout():
    """``<bos> prompt positive <boi> H*W <img>``, left-padded; the unconditional row carries the negative prompt."""
    bb = tiny_backbone()
    tok = bb.tokenizer
    ids, mask = bb.t2i_inputs(PROMPTS, guided=True)
    assert ids.shape[0] == 4 and mask[0, 0] == 0 and bool(mask[2].all())  # the negative prompt is longest
    rows = [tok.decode(r[m.bool()]) for r, m in zip(ids, mask)]
    size = "<|image start|>4*4<|image token|>"
    assert rows[0] == "<|extra_203|>a red circle masterpiece, film grained, best quality." + size
    assert rows[2].startswith("<|extra_203|>lowres, bad anatomy") and rows[2].endswith(size)


def test_caption_prompt_is_baais_chat_layout():
    bb = tiny_backbone()
    codes = torch.arange(16).view(1, 16)
    text = bb.tokenizer.decode(bb.i2t_inputs(codes)[0])
    row = "".join(f"<|visual token {i:06d}|>" for i in range(4)) + "<|extra_200|>"
    assert text.startswith("<|extra_203|>You are a helpful assistant. USER: <|image start|>4*4<|image token|>" + row)
    assert text.endswith("<|extra_200|><|extra_201|><|image end|>Please describe the image. ASSISTANT:")
    assert text.count("<|extra_200|>") == 4  # one end-of-line per row


def test_top_k_restricts_samples_and_scores():
    bb = tiny_backbone(top_k=4)
    s = bb.sample_image(PROMPTS, num_samples=2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lp = bb.logp_image_given_text(s, s.prompts)
        full = bb.logp_image_given_text(s, s.prompts, top_k=None)
    assert (lp.values - s.logps).abs().max() <= 1e-5
    assert bool((lp.values >= full.values - 1e-6).all()) and (lp.values - full.values).abs().max() > 1e-3


def test_image_round_trip_through_the_vq(tmp_path):
    bb = tiny_backbone()
    s = bb.sample_image(PROMPTS[:1], generator=torch.Generator().manual_seed(0))
    image = s.images[0]
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE)
    codes = bb.image_codes([image])
    assert codes.shape == (1, 16) and int(codes.max()) < CODES


def test_saved_folder_is_a_transformers_folder(tmp_path):
    from transformers import Emu3ForConditionalGeneration

    bb = tiny_backbone(guidance_scale=2.0)
    bb.save_pretrained(tmp_path)
    plain = Emu3ForConditionalGeneration.from_pretrained(tmp_path)
    w = "lm_head.weight"
    assert torch.equal(plain.state_dict()[w], bb.model.state_dict()[w])
    from suder import load_backbone

    again = load_backbone("emu3", model=str(tmp_path), device="cpu", max_caption_tokens=4)
    assert again.settings.guidance_scale == 2.0 and again.settings.max_caption_tokens == 4


def test_unknown_option_is_a_backbone_error(tmp_path):
    from suder import load_backbone
    from suder.errors import BackboneError

    tiny_backbone().save_pretrained(tmp_path)
    with pytest.raises(BackboneError, match="Unknown emu3 option"):
        load_backbone("emu3", model=str(tmp_path), device="cpu", guidance=2.0)


def test_registered_and_cheap_to_import():
    code = (
        "import sys, suder\n"
        "import suder_emu3\n"
        "spec = {s.name: s for s in suder.list_backbones()}['emu3']\n"
        "assert (spec.plugin, spec.distribution) == ('emu3', 'suder-emu3'), spec\n"
        "assert 'transformers' not in sys.modules, 'importing suder_emu3 loaded transformers'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_missing_weights_offline_is_one_line(tmp_path):
    """A hub id that is not in the cache, with HF_HUB_OFFLINE=1: one BackboneError line, no traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    (tmp_path / "images").mkdir()
    random_images(1)[0].save(tmp_path / "images" / "0.png")
    done = subprocess.run([sys.executable, "-m", "suder.cli", "run", "--backbone", "emu3", "--model",
                           "BAAI/Emu3-Gen-hf", "--strategy", "und", "--images", str(tmp_path / "images"),
                           "--output-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0
    lines = [x for x in done.stderr.strip().splitlines() if x.strip()]
    assert "BAAI/Emu3-Gen-hf" in done.stderr and "hf download" in done.stderr and "Traceback" not in done.stderr
    assert len(lines) == 1, done.stderr


def test_missing_weights_with_no_hub_fail_fast_without_hf_hub_offline(tmp_path):
    """HF_HUB_OFFLINE unset and the Hub refusing connections (a local port, never a real network): the same one
    line within seconds, not minutes of huggingface_hub's retries."""
    code = (
        "import sys, time\n"
        "import transformers, suder\n"
        "from suder.errors import BackboneError\n"
        "start = time.perf_counter()\n"
        "try:\n"
        "    suder.load_backbone('emu3', model='BAAI/Emu3-Gen-hf', device='cpu')\n"
        "except BackboneError as exc:\n"
        "    print(f'{time.perf_counter() - start:.2f}')\n"
        "    print(exc)\n"
    )
    drop = {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused at once
        env.update(HF_ENDPOINT=f"http://127.0.0.1:{closed.getsockname()[1]}", HF_HOME=str(tmp_path / "hf"))
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and len(lines) == 2, done.stdout + done.stderr
    assert float(lines[0]) < 10, f"{lines[0]} s to fail"
    assert "BAAI/Emu3-Gen-hf" in lines[1] and "hf download" in lines[1] and "cannot be reached" in lines[1]


def test_missing_folder_is_a_backbone_error(tmp_path):
    from suder_emu3 import build_emu3

    from suder.errors import BackboneError

    with pytest.raises(BackboneError, match="does not exist"):
        build_emu3(str(tmp_path / "no-such-folder"), device="cpu")


def test_recipe_resolves_to_the_published_settings():
    from suder_emu3.backbone import Emu3Settings

    from suder.config import resolve

    cfg = resolve(str(HERE.parent / "emu3.yaml"), None)
    assert cfg.backbone == "emu3" and cfg.guidance_scale == Emu3Settings.guidance_scale == 3.0
    assert set(cfg.backbone_options) <= set(Emu3Settings.__dataclass_fields__) | {"device", "dtype", "und_model"}
    assert cfg.backbone_options["und_model"] == "BAAI/Emu3-Chat-hf" and cfg.model == "BAAI/Emu3-Gen-hf"
    assert (HERE.parent / "emu3.yaml").read_text().startswith("# suder run --config ")


def test_two_checkpoints_one_per_direction(tmp_path):
    """With ``und_model`` (Emu3-Chat beside Emu3-Gen), captions come from and train the second checkpoint, images
    the first; the pair saves to one folder and loads back whole."""
    from suder.testing import check_save_load_round_trip, check_trainable_parameters, check_trainer_runs

    pair, gen, chat = tiny_backbone(und_seed=1), tiny_backbone(seed=0), tiny_backbone(seed=1)
    images = random_images(2)
    codes = torch.randint(0, CODES, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(pair.logp_text_given_image(PROMPTS, codes).values,  # codes: the VQs differ
                           chat.logp_text_given_image(PROMPTS, codes).values)
        assert torch.equal(pair.logp_image_given_text(codes, PROMPTS).values,
                           gen.logp_image_given_text(codes, PROMPTS).values)
    und = {id(p) for p in pair.und_model.parameters()}
    assert all(id(p) in und for p in pair.trainable_parameters("und"))
    assert not any(id(p) in und for p in pair.trainable_parameters("gen"))
    check_trainable_parameters(pair, PROMPTS, images)
    cpu = {"device": "cpu"}
    again = check_save_load_round_trip(pair, "emu3", tmp_path / "saved", PROMPTS, images, load_options=cpu)
    assert again.und_model is not None and (tmp_path / "saved" / "und" / "config.json").exists()
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    for i, im in enumerate(random_images(4, seed=3)):
        im.save(data / "images" / f"{i}.png")
    before = {n: p.detach().clone() for n, p in pair.named_parameters()}
    check_trainer_runs(pair, tmp_path / "run", strategy="unified", algo="simpo", prompts_file=str(data / "prompts.txt"),
                       images_dir=str(data / "images"), name="emu3", load_options=cpu)
    for prefix in ("model.lm_head.", "und_model.lm_head."):
        changed = [n for n, p in pair.named_parameters() if n.startswith(prefix) and not torch.equal(p, before[n])]
        assert changed, f"nothing under {prefix} changed"


def test_imports_only_suders_public_api():
    """A third-party package depends on suder's public modules only, never on its internals or built-ins."""
    import ast

    public = {"suder", "suder.errors", "suder.protocol", "suder.sampling", "suder.testing", "suder.hookspecs",
              "suder.worlds", "suder.worlds.shapes"}
    helpers = {"suder.pretrain": {"image_patches", "patch_clusters", "reconstruction_accuracy"}}  # documented
    for path in (HERE.parent / "suder_emu3").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
                if node.module in helpers:
                    imported = {a.name for a in node.names}
                    assert imported <= helpers[node.module], f"{path.name} imports {imported} from {node.module}"
                    continue
            for name in names:
                assert not name.startswith("suder.") or name in public, f"{path.name} imports {name}"


def test_sequences_match_transformers_emu3_processor():
    """Our token ids equal ``Emu3Processor``'s, with its image placeholders replaced by the visual tokens and
    end-of-line tokens as ``Emu3Model`` does (``get_image_features``): the generation prompt with
    ``return_for_image_generation=True``, and the image block of a captioning prompt (32 px / 8 = 4 x 4 codes,
    the tiny model's grid)."""
    import numpy as np
    from emu3_tiny import SPECIALS, _tokenizer_json
    from PIL import Image
    from tokenizers import Tokenizer
    from transformers import Emu3ImageProcessor, Emu3Processor, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()), pad_token=SPECIALS[0], bos_token=SPECIALS[1],
        eos_token=SPECIALS[2], extra_special_tokens={"image_token": "<image>", "boi_token": "<|image start|>",
        "eoi_token": "<|image end|>", "image_wrapper_token": "<|image token|>", "eof_token": "<|extra_201|>"},
    )
    processor = Emu3Processor(Emu3ImageProcessor(min_pixels=32 * 32, max_pixels=32 * 32), tokenizer)
    bb = tiny_backbone()
    text = PROMPTS[1] + bb.settings.positive_prompt
    want = processor(text=[text], return_for_image_generation=True, ratio="1:1", image_area=32 * 32)["input_ids"][0]
    assert bb.t2i_inputs(PROMPTS[1:], guided=False)[0][0].tolist() == list(want)
    s = bb.settings
    chat = f"{s.system_prompt} USER: <image>{s.caption_prompt}. ASSISTANT:"
    ids = processor(images=[Image.fromarray(np.zeros((32, 32, 3), np.uint8))], text=[chat], return_tensors="pt")
    ids = ids["input_ids"][0]
    codes = torch.randint(0, CODES, (1, 16), generator=torch.Generator().manual_seed(0))
    placeholders = ids == tokenizer.image_token_id
    assert int(placeholders.sum()) == 4 * 5
    ids[placeholders] = bb._body(codes)[0]
    assert bb.i2t_inputs(codes)[0].tolist() == ids.tolist()


def test_greedy_guided_images_equal_transformers_generate():
    """Our guided sampler at temperature 0 draws the codes transformers' ``generate`` draws greedily with BAAI's
    recipe: CFG against the negative prompt (``negative_prompt_ids``, scale 3) and the layout's allowed tokens
    (``prefix_allowed_tokens_fn``: visual tokens, an end-of-line token closing each row)."""
    bb = tiny_backbone()
    prompt = PROMPTS[1:]
    ids, mask = bb.t2i_inputs(prompt, guided=False)
    negative = [bb.bos, *bb._encode(bb.settings.negative_prompt + bb._size_tokens())]
    side, start, visual = bb.grid, ids.shape[1], bb.visual_ids.tolist()

    def allowed(batch_id, input_ids):
        done = input_ids.shape[0] - start
        return [bb.eol] if done % (side + 1) == side else visual

    out = bb.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=side * (side + 1), do_sample=False,
                            guidance_scale=3.0, negative_prompt_ids=torch.tensor([negative]),
                            prefix_allowed_tokens_fn=allowed, pad_token_id=bb.pad, eos_token_id=bb.eos)
    rows = out[0, start:].view(side, side + 1)
    assert bool((rows[:, -1] == bb.eol).all())
    want = bb.model.model.vocabulary_mapping.convert_bpe2img(rows).flatten().long()
    got = bb.sample_image(prompt, guidance_scale=3.0, temperature=0.0).tokens[0]
    assert torch.equal(got, want)

"""``suder generate --layout``: each benchmark's prompt format in, the exact folder its scorer reads out."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from suder import exports
from suder.cli import main
from suder.errors import DataError

GENEVAL = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a green circle"},
    {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [], "prompt": "two white squares"},
]


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _geneval_file(tmp_path):
    path = tmp_path / "evaluation_metadata.jsonl"
    # GenEval's own spacing; metadata.jsonl must hold the line unchanged
    path.write_text("".join(json.dumps(r, separators=(", ", ": ")) + "\n" for r in GENEVAL))
    return path


def _dpg_folder(tmp_path):
    folder = tmp_path / "prompts"
    folder.mkdir()
    (folder / "10.txt").write_text("a red triangle and a blue triangle\n")
    (folder / "2.txt").write_text("a blue square")
    return folder


def _colour(c):
    return Image.new("RGB", (8, 8), c)


def test_geneval_reads_its_metadata_and_keeps_each_line(tmp_path):
    items = exports.read_items("geneval", _geneval_file(tmp_path))
    assert [i.prompt for i in items] == ["a green circle", "two white squares"]
    out = tmp_path / "out"
    for i, item in enumerate(items):
        exports.write_item("geneval", out, i, item, [_colour("red")] * 3)
    assert _tree(out) == [
        f"{i:05d}/{f}" for i in (0, 1) for f in ("metadata.jsonl", *[f"samples/{j:04d}.png" for j in range(3)])
    ]
    lines = (tmp_path / "evaluation_metadata.jsonl").read_text().splitlines()
    assert (out / "00001" / "metadata.jsonl").read_text() == lines[1] + "\n"


def test_dpg_bench_reads_its_folder_and_csv_and_writes_2x2_grids_in_crop_order(tmp_path):
    items = exports.read_items("dpg-bench", _dpg_folder(tmp_path))
    assert [(i.key, i.prompt) for i in items] == [
        ("2", "a blue square"),
        ("10", "a red triangle and a blue triangle"),
    ]
    csv_path = tmp_path / "dpg_bench.csv"
    csv_path.write_text(
        "item_id,text,keywords,proposition_id,dependency\n"
        'a1,"A cat, asleep.",k,1,0\n'
        'a1,"A cat, asleep.",k,2,1\n'
        "b2,Two dogs.,k,1,0\n"
    )
    assert [(i.key, i.prompt) for i in exports.read_items("dpg-bench", csv_path)] == [
        ("a1", "A cat, asleep."),
        ("b2", "Two dogs."),
    ]
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    exports.write_item("dpg-bench", tmp_path / "out", 0, items[1], [_colour(c) for c in colours])
    assert _tree(tmp_path / "out") == ["10.png"]
    grid = Image.open(tmp_path / "out" / "10.png")
    r = 8
    assert grid.size == (2 * r, 2 * r)
    # compute_dpg_bench.py's crops, in its order
    for (x, y), c in zip([(0, 0), (r, 0), (0, r), (r, r)], colours):
        assert grid.crop((x, y, x + r, y + r)).getcolors() == [(r * r, c)]


def test_t2i_compbench_reads_tab_separated_lines_and_numbers_files_across_prompts(tmp_path):
    path = tmp_path / "color_val.txt"
    path.write_text("a green bench and a red car\tignored\n\na blue backpack and a brown cow\n")
    items = exports.read_items("t2i-compbench", path)
    assert [i.prompt for i in items] == ["a green bench and a red car", "a blue backpack and a brown cow"]
    out = tmp_path / "out"
    for i, item in enumerate(items):
        exports.write_item("t2i-compbench", out, i, item, [_colour("red")] * 3)
    assert _tree(out) == sorted(
        [f"samples/a green bench and a red car_{n:06d}.png" for n in range(3)]
        + [f"samples/a blue backpack and a brown cow_{n:06d}.png" for n in range(3, 6)]
    )
    # what the BLIP-VQA scorer parses back
    names = sorted((out / "samples").iterdir(), key=lambda f: int(f.name.split("_")[-1].split(".")[0]))
    assert [f.name.split("_")[0] for f in names] == [items[0].prompt] * 3 + [items[1].prompt] * 3


def test_bad_prompt_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"tag": "x"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2 has no string 'prompt'"):
        exports.read_items("geneval", bad)
    under = tmp_path / "u.txt"
    under.write_text("a red_car\n")
    with pytest.raises(DataError, match=r"u.txt:1: .*no '_'"):
        exports.read_items("t2i-compbench", under)
    cols = tmp_path / "c.csv"
    cols.write_text("id,prompt\n1,x\n")
    with pytest.raises(DataError, match="no 'item_id' and 'text' columns"):
        exports.read_items("dpg-bench", cols)
    with pytest.raises(DataError, match="--num-samples 4"):
        exports.check_layout("dpg-bench", 3)
    with pytest.raises(DataError, match="does not exist"):
        exports.read_items("geneval", tmp_path / "missing.jsonl")


def _generate(tiny_toy_path, layout, prompts, out, *extra):
    args = ["generate", "--backbone", "toy", "--model", tiny_toy_path, "--layout", layout]
    return main(args + ["--prompts", str(prompts), "--out", str(out), *extra])


def test_generate_writes_each_layout_with_the_toy_model(tiny_toy_path, tmp_path, capsys):
    assert _generate(tiny_toy_path, "geneval", _geneval_file(tmp_path), tmp_path / "g", "--num-samples", "2") == 0
    assert _tree(tmp_path / "g") == [
        f"{i:05d}/{f}" for i in (0, 1) for f in ("metadata.jsonl", "samples/0000.png", "samples/0001.png")
    ]
    assert json.loads((tmp_path / "g" / "00001" / "metadata.jsonl").read_text()) == GENEVAL[1]

    assert _generate(tiny_toy_path, "dpg-bench", _dpg_folder(tmp_path), tmp_path / "d") == 0
    assert _tree(tmp_path / "d") == ["10.png", "2.png"]
    tile = Image.open(tmp_path / "g" / "00000" / "samples" / "0000.png").size[0]
    assert Image.open(tmp_path / "d" / "2.png").size == (2 * tile, 2 * tile)
    assert f"dist_eval.sh {(tmp_path / 'd').resolve()} {tile}" in capsys.readouterr().err.replace("\n", "")

    t2i = tmp_path / "spatial_val.txt"
    t2i.write_text("a white square below a purple square\n")
    assert _generate(tiny_toy_path, "t2i-compbench", t2i, tmp_path / "t") == 0
    assert _tree(tmp_path / "t") == [f"samples/a white square below a purple square_{n:06d}.png" for n in range(10)]


def test_generate_is_reproducible_and_follows_the_seed(tiny_toy_path, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square\ntwo blue circles\n")
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        assert _generate(tiny_toy_path, "geneval", prompts, tmp_path / name, "--num-samples", "2", "--seed", seed) == 0

    def pixels(name):
        return [list(Image.open(f).getdata()) for f in sorted((tmp_path / name).rglob("*.png"))]

    assert pixels("a") == pixels("b") and pixels("a") != pixels("c")


def test_resume_fills_in_only_what_is_missing_and_gives_the_same_images(tiny_toy_path, tmp_path):
    prompts = tmp_path / "color_val.txt"
    prompts.write_text("a red square\ntwo blue circles\n")
    out = tmp_path / "t"
    assert _generate(tiny_toy_path, "t2i-compbench", prompts, out, "--num-samples", "2") == 0
    first = {f.name: f.read_bytes() for f in (out / "samples").iterdir()}
    (out / "samples" / "two blue circles_000003.png").unlink()  # an interrupted run
    kept = out / "samples" / "a red square_000000.png"
    kept.write_bytes(b"left alone")
    assert _generate(tiny_toy_path, "t2i-compbench", prompts, out, "--num-samples", "2", "--resume") == 0
    again = {f.name: f.read_bytes() for f in (out / "samples").iterdir()}
    assert again == first | {kept.name: b"left alone"}  # prompt 0 skipped, prompt 1 redrawn identically

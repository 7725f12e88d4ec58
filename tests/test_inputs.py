"""Inputs a new user tried: a prompts file with a byte order mark, a corrupt image late in ``--images``, an output
folder that cannot be created. Each is read right or refused in one line before any model is built or run folder
written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from suder.cli import main
from suder.data import check_images, image_pool, prompt_pool, read_prompts
from suder.errors import DataError

BOM = "\ufeff".encode()


def _one_error_line(capsys, code, fragment):
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("Error: ") and fragment in err[0], err


# ------------------------------------------------------------------------------------------- byte order mark
@pytest.mark.parametrize(
    "name,text", [("p.txt", "a red square\na blue circle\n"), ("p.jsonl", '{"prompt": "a red square"}\n')]
)
def test_a_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path, name, text):
    from suder.worlds import shapes

    path = tmp_path / name
    path.write_bytes(BOM + text.encode())
    first = read_prompts(path)[0]["prompt"]
    assert first == "a red square" and shapes.parse_prompt(first) is not None
    assert "a red square" in prompt_pool(str(path), seed=0).items


# ------------------------------------------------------------------------------------------- images
def _folder(tmp_path: Path, bad_name: str, bad: bytes) -> Path:
    from suder.worlds import shapes

    folder = tmp_path / "images"
    shapes.export(6, 0, folder)
    (folder / bad_name).write_bytes(bad)
    return folder


def _png(folder: Path) -> bytes:
    return (folder / "00000.png").read_bytes()


def test_every_image_is_checked_not_only_the_first(tmp_path):
    """A file that is not an image, a truncated PNG and one with a broken chunk checksum, each sorted last."""
    folder = _folder(tmp_path, "zz-not-an-image.png", b"not a png")
    with pytest.raises(DataError, match=r"zz-not-an-image\.png' \(UnidentifiedImageError\)"):
        image_pool(str(folder), seed=0)
    png = _png(folder)
    (folder / "zz-not-an-image.png").unlink()
    (folder / "zz-truncated.png").write_bytes(png[: len(png) // 2])
    with pytest.raises(DataError, match=r"zz-truncated\.png'"):
        image_pool(str(folder), seed=0)
    (folder / "zz-truncated.png").unlink()
    broken = bytearray(png)
    broken[png.index(b"IDAT") + 6] ^= 0xFF  # a data byte: the chunk's checksum no longer matches
    (folder / "zz-checksum.png").write_bytes(bytes(broken))
    with pytest.raises(DataError, match=r"zz-checksum\.png'") as err:
        check_images(sorted(folder.glob("*.png")))
    assert "\n" not in str(err.value)
    (folder / "zz-checksum.png").unlink()
    assert len(image_pool(str(folder), seed=0)) == 6


@pytest.fixture
def nothing_expensive(monkeypatch):
    """Pre-training, building a model or training fails the test."""
    import suder.pretrain
    import suder.trainer
    from suder.backbones.toy import ToyUnifiedLM

    def expensive(*args, **kwargs):
        raise AssertionError("expensive work started before the bad input was reported")

    for owner, name in [(suder.pretrain, "ensure_base"), (suder.trainer, "train"), (ToyUnifiedLM, "__init__")]:
        monkeypatch.setattr(owner, name, expensive)


def test_a_corrupt_image_late_in_images_stops_suder_run_before_the_run_folder(tmp_path, capsys, nothing_expensive):
    folder = _folder(tmp_path, "zz-truncated.png", b"")
    folder.joinpath("zz-truncated.png").write_bytes(_png(folder)[:50])
    out = tmp_path / "run"
    code = main(["run", "--backbone", "toy", "--images", str(folder), "--output-dir", str(out)])
    _one_error_line(capsys, code, "zz-truncated.png'")
    assert not out.exists()


# ------------------------------------------------------------------------------------------- output folders
@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_world_export_into_a_folder_that_cannot_be_created_is_one_line(capsys):
    code = main(["world", "export", "--num", "2", "--out", "/proc/suder-cannot-be-here"])
    _one_error_line(capsys, code, "Cannot create the --out folder '/proc/suder-cannot-be-here'")


def test_checking_an_output_folder_leaves_nothing_behind(tmp_path):
    from suder.data import ensure_writable_dir

    target = tmp_path / "a" / "b" / "c"
    assert ensure_writable_dir(target, create=False) == target and not (tmp_path / "a").exists()
    (tmp_path / "keep").mkdir()
    ensure_writable_dir(tmp_path / "keep" / "new", create=False)
    assert (tmp_path / "keep").is_dir() and os.listdir(tmp_path / "keep") == []

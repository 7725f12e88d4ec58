"""Unpaired training data: a prompt list and an image folder, or ShapesWorld's own streams.

Batches are a pure function of (seed, step, rank), so a resumed run sees exactly the data an uninterrupted
run would have seen.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from pathlib import Path
from typing import Any

from .errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Records with a ``prompt`` field from a ``.txt`` (one prompt a line) or GenEval-style ``.jsonl`` file."""
    p = Path(path)
    if p.is_dir():
        raise DataError(f"Prompt file '{p}' is a folder; pass a .txt (one prompt a line) or .jsonl file.")
    if not p.is_file():
        raise DataError(f"Prompt file '{p}' does not exist; check the path.")
    records: list[dict[str, Any]] = []
    lines = read_text(p, "Prompt file").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{p}:{n} is not valid JSON: {exc.msg}.") from exc
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                raise DataError(f"{p}:{n} has no string 'prompt' field.")
            records.append(rec)
        else:
            records.append({"prompt": line.strip()})
    if not records:
        raise DataError(f"Prompt file '{p}' has no prompts.")
    return records


def read_text(path: str | Path, what: str = "File") -> str:
    """The UTF-8 text of a file, or a one-line ``DataError`` naming the file and what is wrong with it. A byte
    order mark at the start (Windows editors write one) is dropped, not read as part of the first line."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{what} '{p}' is not UTF-8 text (byte {exc.start}: {exc.object[exc.start : exc.start + 1]!r} "
            f"{exc.reason}); save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
        ) from exc
    except OSError as exc:
        raise DataError(f"Cannot read {what.lower()} '{p}': {exc.strerror or exc}; check its permissions.") from exc


def ensure_writable_dir(path: str | Path, what: str = "output folder", *, create: bool = True) -> Path:
    """Make sure ``path`` is (or can be created as) a folder this process can write to; a one-line ``DataError``
    otherwise: a file in the way, no permission, a read-only file system.

    With ``create=False`` nothing is left behind: the missing folders are created and removed again (only trying
    tells whether a folder can be made, e.g. under ``/proc``), so a command can fail on a bad output folder before
    any expensive work without leaving an empty folder behind.
    """
    p = Path(path).expanduser()
    existing = p
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "it is a file" if existing == p else f"'{existing}' is a file, not a folder"
        raise DataError(f"Cannot use '{p}' as the {what}: {where}; pick another path.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DataError(f"Cannot write the {what} '{p}': '{existing}' is not writable; pick a folder you can write to.")
    missing = [p, *p.parents[: len(p.parents) - len(existing.parents) - 1]] if p != existing else []
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"Cannot create the {what} '{p}': {exc.strerror or exc}; pick a folder you can write to."
        ) from exc
    if not create:
        for folder in missing:  # innermost first: remove what the check made
            with contextlib.suppress(OSError):
                folder.rmdir()
    return p


def list_images(folder: str | Path) -> list[Path]:
    """Image files of a folder, in file-name order."""
    d = Path(folder)
    if not d.is_dir():
        problem = "is a file, not a folder" if d.exists() else "does not exist"
        raise DataError(f"Image folder '{d}' {problem}; pass a folder of {', '.join(IMAGE_SUFFIXES)} files.")
    files = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if not files:
        raise DataError(f"Image folder '{d}' has no images ({', '.join(IMAGE_SUFFIXES)}).")
    return files


def _unreadable(path: str | Path, exc: Exception) -> DataError:
    return DataError(
        f"Cannot read image '{path}' ({exc.__class__.__name__}): it is not an image file PIL can open; "
        "remove or replace it."
    )


def load_image(path: str | Path):
    """An RGB PIL image, or a one-line ``DataError``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise _unreadable(path, exc) from exc


_checked: set[tuple[str, int, int]] = set()  # (path, size, mtime_ns) of images that passed ``check_images``


def check_images(files: list[Path]) -> None:
    """Open every image's header and let PIL verify what it can without decoding the pixels (a PNG's chunk
    checksums, a truncated file): a one-line ``DataError`` naming the first bad file, before any model is built or
    run folder written. About 0.1 ms per small PNG; an unchanged file is checked once per process."""
    from PIL import Image

    for path in files:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key in _checked:
            continue
        try:
            with Image.open(path) as im:
                im.verify()
        except Exception as exc:  # verify raises OSError, SyntaxError, struct.error, ... by format and damage
            raise _unreadable(path, exc) from exc
        _checked.add(key)


class Pool:
    """A finite list of items served in seeded, reshuffled epochs."""

    def __init__(self, items: list[Any], seed: int, load=None):
        if not items:
            raise DataError("No training data.")
        self.items, self.seed, self.load = items, seed, load
        self._perms: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.items)

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            order = list(range(len(self.items)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._perms = {epoch: order}
        return self._perms[epoch]

    def batch(self, index: int, size: int) -> list[Any]:
        """The ``index``-th batch of ``size`` items of the endless epoch stream."""
        out = []
        for i in range(index * size, (index + 1) * size):
            epoch, pos = divmod(i, len(self.items))
            item = self.items[self._perm(epoch)[pos]]
            out.append(self.load(item) if self.load else item)
        return out


def prompt_pool(path: str | None, seed: int) -> Pool:
    if path is None:
        from .worlds import shapes

        return Pool(shapes.sample_prompts(2000, seed=seed + 1), seed)
    return Pool([r["prompt"] for r in read_prompts(path)], seed)


def image_pool(folder: str | None, seed: int) -> Pool:
    if folder is None:
        from .worlds import shapes

        return Pool(shapes.sample_scenes(2000, seed=seed + 2), seed, load=shapes.render)
    files = list_images(folder)
    check_images(files)  # fail early on any unreadable image, not at the step that first draws it
    return Pool(files, seed, load=load_image)

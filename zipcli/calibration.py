"""Image folders -> a deterministic stream of preprocessed batches, and the held-out split.

Files are listed (recursively, sorted) and sampled with a seed, in the sample's random order; images are
decoded one batch at a time, so a folder is never held in memory. An image that
cannot be decoded (``DECODE_ERRORS``) is skipped and recorded, by every reader.
"""
from __future__ import annotations

import os
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import CalibrationError
from .specs.format import Preprocess

Image.MAX_IMAGE_PIXELS = 20000 * 20000  # large but bounded: bigger files are refused as bombs
IMAGE_SUFFIXES = {s.lower() for s, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
COMMON_SUFFIXES = tuple(s for s in (".jpg", ".jpeg", ".png", ".webp", ".bmp") if s in IMAGE_SUFFIXES)   # named first in hints
# what decoding an untrusted image may raise: the image is skipped (and recorded), never fatal
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning)

HOLDOUT = 512              # images that score tuning candidates (256 ranked settings worse on the zoos: docs/tuning.md)
HOLDOUT_FRACTION = 0.25     # share of the calibration sample held out when the folder has no spare images
MIN_HOLDOUT = 16            # fewer held-out images than this cannot rank settings


def _suffix(name: str) -> str:
    """``Path(name).suffix``, without making a Path."""
    i = name.rfind(".")
    return name[i:] if 0 < i < len(name) - 1 else ""


def _image_files(root: Path) -> Iterator[tuple[tuple[str, ...], str]]:
    """Every image file under ``root`` as (its path's parts, its path), as ``root.rglob("*")`` finds
    them (links to folders are not entered, unreadable folders are passed over), but from directory
    entries: a stat per file and a Path per file cost seconds on a 50,000-image folder."""
    folders = [(root.parts, str(root))]
    while folders:
        parts, folder = folders.pop()
        try:
            with os.scandir(folder) as entries:
                found = list(entries)
        except PermissionError:
            continue
        for entry in found:
            if entry.is_dir(follow_symlinks=False):
                folders.append((parts + (entry.name,), entry.path))
            elif _suffix(entry.name).lower() in IMAGE_SUFFIXES and entry.is_file():
                yield parts + (entry.name,), entry.path


def list_images(root: str | Path) -> list[Path]:
    """The images under ``root`` (any depth), sorted as Paths sort (by their parts)."""
    root = Path(root)
    if not root.is_dir():
        raise CalibrationError(f"image folder {str(root)!r} does not exist or is not a folder", "check the path")
    files = [Path(path) for _, path in sorted(_image_files(root))]
    if not files:
        raise CalibrationError(f"image folder {str(root)!r} holds no images",
                               f"put images ({', '.join(COMMON_SUFFIXES)} or another of the {len(IMAGE_SUFFIXES)} "
                               "formats Pillow reads) in it, in any sub-folders")
    return files


def sample_images(files: list[Path], n: int, seed: int) -> list[Path]:
    """``n`` files drawn at random with ``seed`` (all of them if fewer), in the order drawn.

    The order is the draw's, never the folder's: folders are usually sorted by class, and every
    later step that reads a prefix of the stream (BatchNorm images for tuning candidates, the
    refit's images, a process's shard, a chunk of a batch) must see every class, not the first few.
    """
    picked = random.Random(seed).sample(range(len(files)), min(n, len(files)))
    return [files[i] for i in picked]


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any mode PIL reads -> 8-bit RGB (16-bit and float images are rescaled, alpha dropped)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        img = Image.fromarray(arr.round().astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def decode(path: Path, pre: Preprocess) -> torch.Tensor:
    """Read one image as a normalised ``[3, size, size]`` float tensor."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            img.draft("RGB", (pre.size * 2, pre.size * 2)) if pre.resize else None
            img = _to_rgb(img)
            img.load()
    if pre.resize is not None:
        w, h = img.size
        scale = pre.resize / min(w, h)
        if scale != 1:
            img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    w, h = img.size
    if w < pre.size or h < pre.size:
        img = img.resize((max(w, pre.size), max(h, pre.size)), Image.BILINEAR)
        w, h = img.size
    left, top = (w - pre.size) // 2, (h - pre.size) // 2
    img = img.crop((left, top, left + pre.size, top + pre.size))
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
    mean = torch.tensor(pre.mean).view(3, 1, 1)
    std = torch.tensor(pre.std).view(3, 1, 1)
    return (x - mean) / std


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding of size/8 and a random horizontal flip (the training recipe)."""
    _, h, w = x.shape
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad))
    i, j = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=gen))
    out = padded[:, i:i + h, j:j + w]
    if torch.rand((), generator=gen) < 0.5:
        out = out.flip(2)
    return out


@dataclass
class ImageStream:
    """The calibration set: which files, how to read them, and what was skipped."""

    files: list[Path]
    preprocess: Preprocess
    batch_size: int = 64
    augment: bool = False
    seed: int = 0
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def readable(self) -> int:
        """Images read so far minus those skipped (all of them once a pass has run)."""
        return len(self.files) - len(self.skipped)

    def with_files(self, files: list[Path], augment: bool | None = None) -> "ImageStream":
        """The same reading rules for other files (skips already found are kept)."""
        return ImageStream(list(files), self.preprocess, self.batch_size,
                           self.augment if augment is None else augment, self.seed, list(self.skipped))

    def first(self, n: int) -> torch.Tensor:
        """The first ``n`` readable images as one ``[n, 3, S, S]`` tensor (fewer if there are fewer)."""
        taken, count = [], 0
        for batch in self.batches():
            taken.append(batch[: n - count])
            count += len(taken[-1])
            if count >= n:
                break
        if not taken:
            raise CalibrationError(f"no calibration image could be read ({len(self.files)} tried)",
                                   "check the image files")
        return torch.cat(taken)

    def chunks(self, size: int) -> Iterator[torch.Tensor]:
        """Every readable image in the stream's order, ``size`` at a time (the last chunk may be
        smaller): the same images and order as ``first``, whatever the batch size."""
        pending = None
        for batch in self.batches():
            pending = batch if pending is None else torch.cat([pending, batch])
            while len(pending) >= size:
                yield pending[:size].clone()
                pending = pending[size:]
        if pending is not None and len(pending):
            yield pending.clone()
        elif pending is None:
            raise CalibrationError(f"no calibration image could be read ({len(self.files)} tried)",
                                   "check the image files")

    def batches(self) -> Iterator[torch.Tensor]:
        """Yield ``[B, 3, S, S]`` batches; unreadable images are skipped and recorded once."""
        gen = torch.Generator().manual_seed(self.seed)
        known_bad = {p for p, _ in self.skipped}
        batch = []
        for path in self.files:
            if path in known_bad:
                continue
            try:
                x = decode(path, self.preprocess)
            except DECODE_ERRORS as exc:
                self.skipped.append((path, f"{exc.__class__.__name__}: {exc}"[:200]))
                known_bad.add(path)
                continue
            batch.append(augment(x, gen) if self.augment else x)
            if len(batch) == self.batch_size:
                yield torch.stack(batch)
                batch = []
        if batch:
            yield torch.stack(batch)


def calibration_stream(folder: str | Path, preprocess: Preprocess, num: int, seed: int,
                       batch_size: int, augment: bool = False) -> ImageStream:
    files = sample_images(list_images(folder), num, seed)
    return ImageStream(files, preprocess, batch_size=batch_size, augment=augment, seed=seed)


def split_holdout(all_files: Sequence, sample: Sequence, seed: int, limit: int | None = None) -> tuple[list, list]:
    """(fit, held-out) files for tuning; the held-out ones in a seeded random order, so that any
    prefix of them is a random sample.

    The held-out images are spare images of the folder, outside the calibration
    sample, so correlations still use the whole sample and the tuned merge equals
    a merge with the chosen values. A folder without ``MIN_HOLDOUT`` spare images
    gives up a seeded share of the sample instead, and a sample too small to
    spare ``MIN_HOLDOUT`` gives an empty held-out list. ``limit``: at most this many
    (what tuning can afford to score).
    """
    most = HOLDOUT if limit is None else min(HOLDOUT, limit)
    gen = torch.Generator().manual_seed(seed + 1)
    chosen = set(sample)
    spare = [f for f in all_files if f not in chosen]
    if len(spare) >= MIN_HOLDOUT:
        return list(sample), [spare[i] for i in torch.randperm(len(spare), generator=gen)[:most].tolist()]
    n_held = min(most, int(len(sample) * HOLDOUT_FRACTION)) // MIN_HOLDOUT * MIN_HOLDOUT
    if n_held < MIN_HOLDOUT:
        return list(sample), []
    order = torch.randperm(len(sample), generator=gen)[:n_held].tolist()
    held = set(order)
    return [f for i, f in enumerate(sample) if i not in held], [sample[i] for i in order]

"""Shared fixtures: tiny image folders and checkpoints made on the fly."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zipcli.bn import reset_batchnorm
from zipcli.calibration import calibration_stream
from zipcli.specs.builders import build_model
from zipcli.specs import Preprocess, load_spec

SHARED = Path(__file__).resolve().parents[2] / "shared"
ZOO = SHARED / "zoo"
CIFAR = SHARED / "datasets" / "cifar10"
needs_shared = pytest.mark.skipif(not ZOO.is_dir() or not CIFAR.is_dir(), reason="../shared (zoo, CIFAR-10) absent")


def handled(result) -> bool:
    """A CliRunner result ended the way zipit ends: success, or SystemExit from its error handler.

    CliRunner catches every exception and keeps it in ``result.exception``, so the
    traceback never reaches ``result.output``: checking the output for "Traceback"
    proves nothing. An exception other than SystemExit is a crash.
    """
    return result.exception is None or isinstance(result.exception, SystemExit)


def make_images(folder: Path, n: int, size: int = 32, seed: int = 0, classes: list[str] | None = None) -> Path:
    """Random RGB PNGs (smooth noise, so features are correlated and not dead)."""
    rng = np.random.default_rng(seed)
    classes = classes or ["img"]
    for i in range(n):
        sub = folder / classes[i % len(classes)]
        sub.mkdir(parents=True, exist_ok=True)
        low = rng.uniform(0, 255, (4, 4, 3))
        img = Image.fromarray(low.astype(np.uint8)).resize((size, size), Image.BILINEAR)
        arr = np.clip(np.asarray(img, dtype=np.float64) + rng.normal(0, 20, (size, size, 3)), 0, 255)
        Image.fromarray(arr.astype(np.uint8)).save(sub / f"{i:04d}.png")
    return folder


def small_spec(name: str, size: int | None = None):
    """A built-in spec with a smaller input (fast tests of the big torchvision models)."""
    spec = load_spec(name)
    if size is None:
        return spec
    return dataclasses.replace(spec, input=Preprocess(size, None, spec.input.mean, spec.input.std))


def save_checkpoint(path: Path, state: dict, classes: list[str] | None = None) -> Path:
    torch.save(state, path)
    if classes is not None:
        path.with_suffix(".json").write_text(json.dumps({"classes": classes}))
    return path


def random_model(spec, num_classes: int, seed: int, calib: Path | None = None):
    """A model with random weights and, like a trained one, features that are alive on data:
    biases centred and BatchNorm statistics measured on the calibration images.

    (With statistics unrelated to the data, many channels are dead on it, and
    dead channels carry no information to match them by.)
    """
    torch.manual_seed(seed)
    model = build_model(spec, num_classes)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    if calib is not None:
        _center_biases(model, torch.cat(list(calibration_stream(calib, spec.input, 64, 0, 16).batches())))
        reset_batchnorm(model, calibration_stream(calib, spec.input, 64, 0, 16).batches())
    return model.eval()


@torch.no_grad()
def _center_biases(model, x: torch.Tensor) -> None:
    """Shift each biased layer's outputs to mean 0 on ``x`` (one pass: each layer sees the centred
    outputs of the layers before it), so that models without BatchNorm (VGG) have no channels that
    are dead on every image."""
    def center(layer, _inputs, out):
        axis = out.dim() - 1 if isinstance(layer, torch.nn.Linear) else 1   # a linear layer on tokens: the last
        mean = out.mean([d for d in range(out.dim()) if d != axis])
        layer.bias -= mean
        return out - mean.view(-1, *([1] * (out.dim() - 1 - axis)))

    handles = [m.register_forward_hook(center) for m in model.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.bias is not None]
    try:
        model.train(False)(x)
    finally:
        for h in handles:
            h.remove()


@pytest.fixture(scope="session")
def calib32(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("calib32"), 24, 32)


@pytest.fixture(scope="session")
def calib64(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("calib64"), 12, 64)


def resnet20_pair(root: Path, calib: Path, classes=(["a0", "a1"], ["b0", "b1", "b2"])) -> tuple[Path, Path]:
    """Two differently initialised ResNet-20 checkpoints A.pt and B.pt in ``root``, with class sidecars."""
    spec = small_spec("resnet20")
    return tuple(save_checkpoint(root / f"{name}.pt", random_model(spec, len(c), seed, calib).state_dict(), list(c))
                 for name, c, seed in (("A", classes[0], 1), ("B", classes[1], 2)))

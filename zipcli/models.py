"""Model builders that specs refer to, and how a spec's builder string is resolved.

A builder string is ``module:function`` (``zipcli.models:cifar_resnet20``,
``torchvision.models:resnet50``). Only importable, installed modules are used;
nothing is evaluated.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Callable

import torch.nn as nn
import torch.nn.functional as F

from .errors import SpecError


class BasicBlock(nn.Module):
    """ResNet-20 block with a 3x3 projection shortcut (the zoo's layout)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet20(nn.Module):
    """CIFAR ResNet-20 with width multiplier ``width`` (16w, 32w, 64w channels)."""

    def __init__(self, width: int = 1, num_classes: int = 10):
        super().__init__()
        widths = [16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        cin = widths[0]
        for i, c in enumerate(widths):
            blocks = []
            for j in range(3):
                blocks.append(BasicBlock(cin, c, 2 if (i > 0 and j == 0) else 1))
                cin = c
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(widths[2], num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.avgpool(x).flatten(1))


def cifar_resnet20(width: int = 1, num_classes: int = 10) -> nn.Module:
    return CifarResNet20(width=width, num_classes=num_classes)


class CifarVGG(nn.Module):
    """VGG for 32x32 images as in the paper's appendix: 3x3 convolutions with ReLU (no BatchNorm),
    five max-pools down to 1x1, and one linear classifier."""

    def __init__(self, config: list, width: int = 1, num_classes: int = 10):
        super().__init__()
        layers, cin = [], 3
        for c in config:
            if c == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, c * width, 3, padding=1), nn.ReLU()]
                cin = c * width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


VGG11_CONFIG = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


def cifar_vgg11(width: int = 1, num_classes: int = 10) -> nn.Module:
    return CifarVGG(VGG11_CONFIG, width=width, num_classes=num_classes)


def canonical_builder(name: str) -> str:
    """``module:function`` for ``module:function``, ``package.module.function`` or a torchvision model name."""
    if not isinstance(name, str) or not name:
        raise SpecError(f"builder {name!r} is not a name",
                        "write e.g. torchvision.models.resnet50 or mypkg.models:build")
    if ":" in name:
        return name
    if "." in name:
        module, _, func = name.rpartition(".")
        return f"{module}:{func}"
    return f"torchvision.models:{name}"


def resolve_builder(name: str) -> Callable[..., nn.Module]:
    """Turn ``module:function`` into the callable, with errors that say what to write."""
    if not isinstance(name, str) or name.count(":") != 1:
        raise SpecError(
            f"builder {name!r} is not of the form 'module:function'",
            "write e.g. 'torchvision.models:resnet50' or 'mypkg.models:build'",
        )
    module_name, func_name = name.split(":")
    if os.getcwd() not in sys.path:  # like python -m: ./mymodels.py is importable from its folder
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SpecError(
            f"builder module {module_name!r} cannot be imported: {exc}",
            "install the package that provides it, fix the builder name, or run from the folder that holds it "
            "(or set PYTHONPATH to it)",
        ) from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise SpecError(
            f"builder {name!r}: {module_name} has no callable {func_name!r}",
            "check the function name",
        )
    return func


def check_num_classes_arg(builder: str, arg: str) -> None:
    """Merge builds each model with ``arg=<the checkpoint's class count>``: refuse, before any merge,
    a builder that cannot take it."""
    try:
        params = inspect.signature(resolve_builder(builder)).parameters.values()
    except (TypeError, ValueError):  # no readable signature (e.g. a C function): merge will tell
        return
    if any(p.kind is p.VAR_KEYWORD or (p.name == arg and p.kind is not p.POSITIONAL_ONLY) for p in params):
        return
    raise SpecError(f"builder {builder} has no argument {arg!r} for the number of classes",
                    "if it has one under another name, pass --num-classes-arg NAME to 'zipit specs trace' (or set "
                    f"num_classes_arg: NAME in the spec); else give it a {arg} argument")


def build(builder: str, kwargs: dict) -> nn.Module:
    """Call a builder with keyword arguments; its failures become one-line errors."""
    func = resolve_builder(builder)
    try:
        model = func(**kwargs)
    except Exception as exc:  # the user's code: any error means the arguments do not fit
        raise SpecError(f"builder {builder} failed: {exc.__class__.__name__}: {exc}",
                        "check the builder's keyword arguments (--kw NAME=VALUE)") from None
    if not isinstance(model, nn.Module):
        kind = type(model).__name__
        raise SpecError(f"builder {builder} returned {'an' if kind[0] in 'aeiouAEIOU' else 'a'} {kind}, "
                        "not a torch.nn.Module",
                        "the builder must return the model")
    return model.eval()

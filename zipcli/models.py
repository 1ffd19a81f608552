"""zipit's own architectures: the CIFAR ResNet-20 of the model zoo and the paper's CIFAR VGG11.

Built-in specs name these functions as builders (``zipcli.models:cifar_resnet20``);
merged files store that name, so it must not move.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F


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

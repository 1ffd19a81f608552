"""zipit's own architectures: the CIFAR ResNet-20 of the model zoo, the paper's CIFAR VGG11, a small ViT,
and torchvision's ViT-B/16 with its attention split into layers zipit can see.

Built-in specs name these functions as builders (``zipcli.models:cifar_resnet20``);
merged files store that name, so it must not move.
"""
from __future__ import annotations

from functools import cache

import torch
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


class Attention(nn.Module):
    """Multi-head self-attention with separate query, key and value projections, so that each
    projection's output features (and the heads they form) are plain Linear outputs to trace."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        split = lambda t: t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CifarViT(nn.Module):
    """A small vision transformer for 32x32 images: 4x4 patches, a class token, learned position
    embeddings, pre-norm blocks, a final LayerNorm and a linear head on the class token."""

    def __init__(self, depth: int = 6, dim: int = 192, heads: int = 3, mlp_ratio: int = 2, patch: int = 4,
                 image_size: int = 32, num_classes: int = 10):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (image_size // patch) ** 2, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads, dim * mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def cifar_vit(depth: int = 6, dim: int = 192, heads: int = 3, mlp_ratio: int = 2, patch: int = 4,
              num_classes: int = 10) -> nn.Module:
    return CifarViT(depth=depth, dim=dim, heads=heads, mlp_ratio=mlp_ratio, patch=patch, num_classes=num_classes)


class SplitAttention(nn.Module):
    """``nn.MultiheadAttention`` (batch first, no mask, no weights returned) with its packed
    query/key/value projection split into three Linear children and its output projection called
    as a module: the same maths, but tracing, hooks and the refit see each projection."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden_dim {dim} is not a multiple of num_heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    @torch.no_grad()
    def copy_from(self, mha: nn.MultiheadAttention) -> "SplitAttention":
        """Take ``mha``'s weights (its initialisation, for a model built with random weights)."""
        for name, w, b in zip("qkv", mha.in_proj_weight.chunk(3), mha.in_proj_bias.chunk(3)):
            getattr(self, name).weight.copy_(w)
            getattr(self, name).bias.copy_(b)
        self.out_proj.load_state_dict(mha.out_proj.state_dict())
        return self

    def forward(self, query, key, value, need_weights: bool = False):
        b, n, d = query.shape
        split = lambda t: t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.q(query)), split(self.k(key)), split(self.v(value)),
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d)), None


@cache
def _vision_transformer():
    """The class, made once on first use: importing torchvision costs a second that merges of
    other models need not pay."""
    from torchvision.models.vision_transformer import VisionTransformer

    class SplitViT(VisionTransformer):
        """torchvision's VisionTransformer whose attention is ``SplitAttention``; reads checkpoints of
        torchvision's own (packed ``in_proj_weight``/``in_proj_bias``) through ``translate_state_dict``."""

        def translate_state_dict(self, state: dict) -> dict:
            """torchvision's keys -> this model's: each packed projection split into q, k and v."""
            out = {}
            for key, t in state.items():
                prefix, _, attr = key.rpartition(".")
                if attr in ("in_proj_weight", "in_proj_bias") and prefix.endswith("self_attention"):
                    for name, part in zip("qkv", t.chunk(3)):
                        out[f"{prefix}.{name}.{attr[len('in_proj_'):]}"] = part
                else:
                    out[key] = t
            return out

    return SplitViT


def vit_b_16(image_size: int = 224, patch_size: int = 16, num_layers: int = 12, num_heads: int = 12,
             hidden_dim: int = 768, mlp_dim: int = 3072, num_classes: int = 1000, **kwargs) -> nn.Module:
    """torchvision's ``vit_b_16`` (its defaults; any other ``VisionTransformer`` argument in ``kwargs``),
    with random weights as torchvision initialises them, each attention as ``SplitAttention``."""
    model = _vision_transformer()(image_size=image_size, patch_size=patch_size, num_layers=num_layers,
                                  num_heads=num_heads, hidden_dim=hidden_dim, mlp_dim=mlp_dim,
                                  num_classes=num_classes, **kwargs)
    for block in model.encoder.layers:
        mha = block.self_attention
        block.self_attention = SplitAttention(hidden_dim, num_heads, mha.dropout).to(
            mha.in_proj_weight.device).copy_from(mha)
    return model

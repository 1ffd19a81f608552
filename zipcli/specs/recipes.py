"""The recipes of the built-in specs: how each YAML in ``zipcli/specs/builtin/`` is generated.

``python -m zipcli.specs.recipes`` rewrites them; a test checks the files on disk
are exactly what the tracer produces now.
"""
from __future__ import annotations

CIFAR = {"size": 32, "resize": None, "mean": [0.4914, 0.4822, 0.4465], "std": [0.247, 0.2435, 0.2616]}
IMAGENET = {"size": 224, "resize": 256, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
PRESETS = {"imagenet": IMAGENET, "cifar": CIFAR}   # 'zipit specs trace --input NAME'

TORCHVISION = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
               "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
               "mobilenet_v2", "densenet121")

RECIPES = {
    **{
        f"resnet20{'' if w == 1 else f'x{w}'}": dict(
            builder="zipcli.models:cifar_resnet20", kwargs={"width": w}, preprocess=CIFAR,
            description=f"CIFAR ResNet-20, width x{w} (16w/32w/64w channels, 3x3 projection shortcuts)",
        )
        for w in (1, 2, 4, 8)
    },
    "cifar_vgg11": dict(builder="zipcli.models:cifar_vgg11", kwargs={"width": 1}, preprocess=CIFAR,
                        description="CIFAR VGG11, width x1 (the paper's appendix model: no BatchNorm, one linear "
                                    "classifier)"),
    "cifar_vit": dict(builder="zipcli.models:cifar_vit", kwargs={}, preprocess=CIFAR,
                      description="small ViT for 32 px images (6 blocks, 192 features, 3 heads, 4x4 patches); stops "
                                  "after each block (the heads unmerge the residual stream) and after the final "
                                  "LayerNorm"),
    "vit_b_16": dict(builder="zipcli.models:vit_b_16", kwargs={}, preprocess=IMAGENET,
                     description="torchvision ViT-B/16 (12 blocks, 768 features, 12 heads, 16x16 patches) with its "
                                 "attention split into query/key/value layers (zipcli.models:vit_b_16 reads "
                                 "torchvision's checkpoints); stops after each block and after the final LayerNorm",
                     stops=[f"encoder.layers.encoder_layer_{i}" for i in range(12)] + ["encoder.ln"]),
    **{name: dict(builder=f"torchvision.models:{name}", kwargs={}, preprocess=IMAGENET,
                  description=f"torchvision {name}") for name in TORCHVISION},
}
# DenseNet's stage boundaries lie one level deeper than the tracer looks: after each transition's
# BatchNorm (its convolution then reads the merged features through U, in the heads).
RECIPES["densenet121"]["stops"] = [f"features.transition{i}.norm" for i in (1, 2, 3)] + ["features"]


def generate(name: str) -> str:
    from .authoring import dump_spec, spec_document

    r = RECIPES[name]
    doc = spec_document(name, r["builder"], r["kwargs"], r["preprocess"], description=r["description"],
                        stops=r.get("stops"))
    return dump_spec(doc)


def main() -> None:
    from .library import BUILTIN_DIR

    for name in RECIPES:
        (BUILTIN_DIR / f"{name}.yaml").write_text(generate(name), encoding="utf-8")
        print(f"wrote {BUILTIN_DIR / (name + '.yaml')}")


if __name__ == "__main__":
    main()

"""Which builders a spec may name: opening a file never makes zipit import code the file chose.

A spec (a YAML file, or the copy stored in every merged file) names the function
that builds its model. zipit imports it only if it is one of zipit's own models or
one of torchvision's registered model builders, or if the user trusted its module
for this run (``--trust-builder MODULE``; Python: ``trust_builders=["MODULE"]``),
in the spirit of ``trust_remote_code``. The check runs on the name alone, before
any import. Keyword arguments must be plain data, and never ask for downloads.
"""
from __future__ import annotations

from functools import cache
from typing import Iterable

from ..errors import SpecError

ZIPIT_BUILDERS = frozenset({"zipcli.models:cifar_resnet20", "zipcli.models:cifar_vgg11", "zipcli.models:cifar_vit",
                            "zipcli.models:vit_b_16"})
TORCHVISION_MODULE = "torchvision.models"
DOWNLOAD_KWARGS = frozenset({"weights", "weights_backbone", "pretrained", "pretrained_backbone"})


@cache
def _torchvision_builders() -> frozenset[str]:
    """torchvision's registered classification builders (importing torchvision.models is trusted)."""
    import torchvision.models as models

    return frozenset(models.list_models(module=models))


def trusted_by_zipit(builder: str) -> bool:
    if builder in ZIPIT_BUILDERS:
        return True
    module, _, func = builder.partition(":")
    return module == TORCHVISION_MODULE and func in _torchvision_builders()


ANY = ("<any>",)   # for parsing a spec whose builder is replaced before anything is built (specs check --builder)


def _in_modules(module: str, trusted: Iterable[str]) -> bool:
    return trusted is ANY or any(module == t or module.startswith(t + ".") for t in trusted)


def check_builder_trusted(builder: str, trust: Iterable[str], origin: str) -> None:
    """Refuse, before any import, a builder that is neither zipit's nor in a module the user trusts."""
    module = builder.partition(":")[0]
    if _in_modules(module, trust) or trusted_by_zipit(builder):
        return
    raise SpecError(f"{origin}: builder {builder!r} is not trusted, and zipit imports no code that a file names",
                    f"if you trust the module, say so for this run: --trust-builder {module} "
                    f"(Python: trust_builders=[{module!r}])")


def _plain(value) -> bool:
    scalar = (bool, int, float, str, type(None))
    return isinstance(value, scalar) or (isinstance(value, list) and all(isinstance(v, scalar) for v in value))


def check_kwargs(kwargs: dict, origin: str) -> None:
    """A builder's keyword arguments: plain data (numbers, strings, booleans, null, lists of these),
    and nothing that would download weights."""
    for name, value in kwargs.items():
        if not _plain(value):
            raise SpecError(f"{origin}: kwargs.{name} is a {type(value).__name__}, not plain data",
                            "a builder argument must be a number, string, boolean, null or a list of these")
        if name in DOWNLOAD_KWARGS and value not in (None, False):
            raise SpecError(f"{origin}: kwargs.{name} asks the builder to download weights",
                            f"zipit builds models with random weights and never downloads: remove {name}")

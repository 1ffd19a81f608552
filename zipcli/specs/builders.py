"""A spec's builder string -> the function that builds its model, and the model built.

A builder string is ``module:function`` (``zipcli.models:cifar_resnet20``,
``torchvision.models:resnet50``). Only importable, installed modules are used;
nothing is evaluated.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
import warnings
from typing import Callable

import torch.nn as nn

from ..errors import SpecError, ZipitError
from .format import Spec


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


def check_arguments(builder: str, func: Callable, kwargs: dict, hint: str = "") -> None:
    """Refuse keyword arguments the builder does not take (unless it takes ``**kwargs``), before calling it."""
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):  # no readable signature: the call will tell
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(k for k in kwargs if k not in params or params[k].kind is inspect.Parameter.POSITIONAL_ONLY)
    if unknown:
        raise SpecError(f"builder {builder} takes no argument {', '.join(map(repr, unknown))}",
                        hint or f"its arguments: {', '.join(params) or 'none'}")


def _argument_names(func: Callable) -> str:
    try:
        return ", ".join(inspect.signature(func).parameters) or "no arguments"
    except (TypeError, ValueError):
        return "(unknown)"


def build(builder: str, kwargs: dict) -> nn.Module:
    """Call a builder with keyword arguments; its failures become one-line errors."""
    func = resolve_builder(builder)
    check_arguments(builder, func, kwargs)
    try:
        with warnings.catch_warnings():   # e.g. torchvision's notes on weight initialisation: random
            warnings.simplefilter("ignore", FutureWarning)   # weights are all zipit ever builds
            warnings.simplefilter("ignore", UserWarning)
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


def build_model(spec: Spec, num_classes: int) -> nn.Module:
    """The spec's model with ``num_classes`` outputs (random weights, eval mode)."""
    func = resolve_builder(spec.builder)
    kwargs = {**spec.kwargs, spec.num_classes_arg: num_classes}
    check_arguments(spec.builder, func, kwargs, f"check the spec's kwargs and its num_classes_arg (the builder's "
                    f"argument for the number of classes); the builder takes: {_argument_names(func)}")
    try:
        with warnings.catch_warnings():   # e.g. torchvision's notes on weight initialisation: random
            warnings.simplefilter("ignore", FutureWarning)   # weights are all zipit ever builds
            warnings.simplefilter("ignore", UserWarning)
            model = func(**kwargs)
    except ZipitError:
        raise
    except Exception as exc:
        raise ZipitError(f"spec {spec.name!r}: builder {spec.builder} failed: {exc.__class__.__name__}: {exc}",
                         "check the spec's kwargs and its num_classes_arg (the builder's argument for the "
                         "number of classes)") from None
    if not isinstance(model, nn.Module):
        raise ZipitError(f"spec {spec.name!r}: builder {spec.builder} returned a {type(model).__name__}, "
                         "not a torch.nn.Module", "the builder must return the model")
    return model.eval()

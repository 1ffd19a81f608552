"""What a merge is asked to do: the options of one merge (``MergeOptions``, the CLI's options), and
one point to merge at (``MergePoint``: stop, method and its setting, refit, dtype, merged widths), which the
default's choice turns the options into.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import methods
from .errors import ZipitError
from .refit import REFITS
from .tuning import FALLBACK, Setting

AUTO = "auto"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass
class MergeOptions:
    """How to merge; defaults follow the paper and its data-usage appendix. Each field is also a
    ``zipit merge`` option of the same name (``num_calib`` is ``--num-calib``)."""

    method: str = "auto"         # auto: permute, unless zipit is better by more than the score's noise
    alpha: float | None = None   # zipit: weight of a merged feature's correlations (repeated matching); None: tune
    beta: float | None = None    # zipit: share of merges allowed within one model; None: tune
    stop: str | None = None      # None: the spec's default (everything but the classifiers)
    num_calib: int = 512         # calibration images (the paper: a few hundred suffice)
    seed: int = 0
    batch_size: int = 64
    augment: bool = False
    reset_bn: bool = True
    refit: str = "lsq"           # solve each merged layer's weights against the sources' outputs; none: keep the zip's
    device: str = "cpu"
    dtype: str | None = None     # output dtype; None keeps the first checkpoint's
    classes: list[list[str]] | None = None  # per checkpoint, overrides sidecars
    params: dict[str, float] = field(default_factory=dict)   # a method's own parameters beyond alpha, beta
    size: float | None = None    # the merged model's parameters as a multiple of one source model, in [1, n];
                                 # None: the full zip (every feature merged)

    def __post_init__(self):
        """Names are checked at once (a typo fails where it is written, not when merge() runs); what
        needs the number of models waits for ``validate``."""
        self._check_names()

    def _check_names(self) -> None:
        if self.method not in (AUTO, *methods.REGISTRY):
            raise ZipitError(f"unknown method {self.method!r}",
                             f"valid methods (--method): {AUTO}, {', '.join(methods.REGISTRY)}")
        if self.refit not in REFITS:
            raise ZipitError(f"unknown refit {self.refit!r}", f"valid refits (--refit): {', '.join(REFITS)}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ZipitError(f"unknown dtype {self.dtype!r}", f"valid dtypes (--dtype): {', '.join(DTYPES)}")

    def given(self, method: str) -> dict[str, float | None]:
        """The values given for ``method``'s parameters (None: left open); others' are not its."""
        values = {"alpha": self.alpha, "beta": self.beta, **self.params}
        return {k: v for k, v in values.items() if k in methods.get(method).param_names}

    @property
    def tunes(self) -> bool:
        """Something is chosen on held-out calibration images: the method (auto), or a tunable
        parameter of the method left open (zipit's alpha or beta)."""
        given = self.given(self.method) if self.method != AUTO else {}
        return self.method == AUTO or any(given.get(p) is None for p in methods.get(self.method).tunable)

    @property
    def matching(self) -> str:
        """The matching method of the settings searched: zipit's, for auto."""
        return "zipit" if self.method == AUTO else self.method

    @property
    def fixed_setting(self) -> Setting:
        """The given alpha and beta, the paper's values where one is left open."""
        return Setting(FALLBACK[0] if self.alpha is None else self.alpha,
                       FALLBACK[1] if self.beta is None else self.beta)

    def validate(self, n_models: int, strict: bool = True) -> None:
        """Refuse bad options before any work. ``strict``: every ``params`` name must be a parameter
        of this method (a sweep over several methods passes each only the ones it takes)."""
        self._check_names()                     # again: fields may have been set since construction
        method = methods.get(self.matching)
        for name in self.params:
            if name in ("alpha", "beta"):
                raise ZipitError(f"--param {name}: zipit's {name} has an option of its own", f"use --{name}")
            if strict and name not in method.param_names:
                raise ZipitError(f"method {method.name} has no parameter {name!r}",
                                 f"its parameters: {', '.join(method.param_names) or 'none'} (--param NAME=VALUE)")
        method.check(self.given(self.matching), n_models)
        self._check_size(n_models)
        if not 0 <= self.seed < 2**63:
            raise ZipitError(f"seed {self.seed} is outside [0, 2^63)", "give a seed (--seed) of 0 or more, below 2^63")
        for name, value in (("num_calib", self.num_calib), ("batch_size", self.batch_size)):
            if value < 1:
                raise ZipitError(f"{name} {value} must be at least 1", f"set {name} (--{name.replace('_', '-')}) to 1 or more")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ZipitError("device cuda was asked for but no CUDA device is available", "use device (--device) cpu")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ZipitError(f"unknown device {self.device!r}", "valid devices (--device): cpu, cuda, cuda:N")


    def _check_size(self, n_models: int) -> None:
        """A size lies in [1, n] (n sources side by side cost n times one), with a method that keeps
        features apart."""
        if self.size is None:
            return
        if isinstance(self.size, bool) or not isinstance(self.size, (int, float)) or not 1 <= self.size <= n_models:
            raise ZipitError(f"size (--size) {self.size!r} is outside [1, {n_models}]",
                             f"the merged model's parameter count as a multiple of one source model: from 1 "
                             f"(the full zip) to {n_models} (the {n_models} sources' together)")
        if not methods.get(self.matching).partial:
            raise ZipitError(f"method {self.method} cannot merge at a size (it keeps no feature apart)",
                             "use size (--size) with method (--method) auto, zipit or permute")


@dataclass(frozen=True)
class MergePoint:
    """One merge of a calibration: where the trunk stops, the matching method and its setting, the
    refit, and the output dtype (None: the first checkpoint's)."""

    stop: str
    method: str
    setting: Setting
    refit: str = "none"
    dtype: str | None = None
    params: tuple[tuple[str, float], ...] = ()      # the method's own parameters beyond alpha and beta
    widths: tuple[tuple[str, int], ...] = ()        # merged spaces wider than one model's (the size dial)
    size: float | None = None                       # the size asked for (None: none; widths alone may be given)

"""The built-in specs: YAML files shipped as package data in ``zipcli/specs/builtin/``."""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Iterable

from ..errors import SpecError
from .format import MAX_SPEC_CHARS, Spec, parse_spec
from .trust import ANY

BUILTIN_DIR = Path(str(resources.files(__package__) / "builtin"))


def builtin_spec_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def load_spec(arch: str | None = None, path: str | Path | None = None, trust_builders: Iterable[str] = ()) -> Spec:
    """Load a built-in spec by name (``arch``) or a user's spec file (``path``); from Python a
    ``.yaml``/``.yml`` path works as ``arch`` too, as in ``load_spec("small_cnn.yaml")``.

    A spec file whose builder is not zipit's or torchvision's is refused unless its module is
    in ``trust_builders`` (``--trust-builder MODULE``): a file never chooses code to run."""
    if (arch is None) == (path is None):
        raise SpecError("give exactly one of --arch NAME or --spec FILE",
                        f"built-in architectures: {', '.join(builtin_spec_names())}")
    if arch is not None and arch not in builtin_spec_names() and Path(arch).suffix in (".yaml", ".yml"):
        arch, path = None, arch
    if arch is not None:
        file = BUILTIN_DIR / f"{arch}.yaml"
        if arch not in builtin_spec_names():
            raise SpecError(f"unknown architecture {arch!r}",
                            f"valid: {', '.join(builtin_spec_names())}; or a spec file: --spec FILE "
                            "(Python: load_spec(path=FILE))")
    else:
        file = Path(path)
    try:
        if file.exists() and not file.is_file():     # a pipe or a device has no size to check, and may never end
            raise SpecError(f"spec file {str(file)!r} is not a regular file", "give the path of a .yaml file")
        with open(file, "rb") as f:
            raw = f.read(MAX_SPEC_CHARS * 4 + 1)          # never more than a spec can be, whatever the file claims
        if len(raw) > MAX_SPEC_CHARS * 4:
            raise SpecError(f"spec file {str(file)!r} is too large to be a spec", "check the path")
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise SpecError(f"spec file {str(file)!r} does not exist", "check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"spec file {str(file)!r} cannot be read: {exc}") from None
    if path is None:   # zipit's own files: their builders are zipit's or torchvision's (checked by a test)
        return parse_spec(text, origin=f"spec {arch}", trust_builders=ANY)
    return parse_spec(text, origin=str(file), trust_builders=trust_builders)

"""Architecture specs: which channels of which layers belong together, as data.

format     YAML text -> a validated ``Spec``
library    the built-in specs (package data in ``builtin/``)
builders   a spec's ``module:function`` -> the model it builds
layers     what zipit knows about each layer type (one table)
graph      spec + built model -> checked feature spaces, stop plans, trunk/head split
tracing    a model -> its feature spaces, derived with torch.fx
authoring  a traced model -> a complete spec document and its YAML
selfcheck, coverage, check   what ``zipit specs check`` verifies without data
recipes    how each built-in spec is generated
"""
from .format import OUTPUT_STOP, Member, Preprocess, Space, Spec, parse_spec
from .library import BUILTIN_DIR, builtin_spec_names, load_spec

__all__ = ["BUILTIN_DIR", "OUTPUT_STOP", "Member", "Preprocess", "Space", "Spec", "builtin_spec_names", "load_spec",
           "parse_spec"]

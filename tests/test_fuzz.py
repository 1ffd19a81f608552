"""Fuzzing: random specs, bytes, tensor dicts and metadata end in success or zipit's own error."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from zipcli.checkpoints import check_against, load_checkpoint, read_state_dict
from zipcli.errors import ZipitError
from zipcli.merged import load_merged
from zipcli.specs.builders import build_model
from zipcli.specs import BUILTIN_DIR, parse_spec

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
REAL_SPEC = yaml.safe_load((BUILTIN_DIR / "resnet20.yaml").read_text())

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 100), st.floats(allow_nan=True),
                    st.text(max_size=12))
documents = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                          st.dictionaries(st.text(max_size=10), kids, max_size=4)),
                         max_leaves=20)


@FAST
@given(documents)
def test_random_yaml_documents(doc):
    try:
        parse_spec(yaml.safe_dump(doc))
    except ZipitError:
        pass


@FAST
@given(st.sampled_from(sorted(REAL_SPEC)), documents)
def test_real_spec_with_one_key_replaced(key, value):
    doc = dict(REAL_SPEC, **{key: value})
    try:
        parse_spec(yaml.safe_dump(doc))
    except ZipitError:
        pass


@FAST
@given(st.text(max_size=300))
def test_random_text_as_spec(text):
    try:
        parse_spec(text)
    except ZipitError:
        pass


@FAST
@given(st.binary(max_size=400), st.sampled_from([".pt", ".safetensors", ".pth"]))
def test_random_bytes_as_checkpoint(data, suffix):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"x{suffix}"
        path.write_bytes(data)
        try:
            read_state_dict(path)
        except ZipitError:
            pass


tensors = st.builds(lambda shape, fill: torch.full(shape, fill),
                    st.lists(st.integers(0, 3), max_size=3).map(tuple),
                    st.floats(allow_nan=True, allow_infinity=True, width=32))


@FAST
@given(st.dictionaries(st.sampled_from(["conv1.weight", "linear.weight", "bn1.bias", "module.x", "w"]), tensors,
                       max_size=4), st.booleans())
def test_random_tensor_dicts_as_checkpoint(state, nest):
    expected = build_model(parse_spec((BUILTIN_DIR / "resnet20.yaml").read_text()), 3).state_dict()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.pt"
        torch.save({"state_dict": state} if nest else state, path)
        try:
            check_against(load_checkpoint(path), expected)
        except ZipitError:
            pass


@FAST
@given(st.dictionaries(st.sampled_from(["format", "spec", "stop", "heads", "sources", "spaces", "x"]),
                       st.one_of(st.text(max_size=30), documents.map(json.dumps)), max_size=6),
       st.booleans())
def test_random_metadata_as_merged_file(meta, real_format):
    if real_format:
        meta["format"] = "zipit-merged/1"
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.safetensors"
        save_file({"trunk.conv1.weight": torch.zeros(2)}, str(path), metadata=meta)
        try:
            load_merged(path)
        except ZipitError:
            pass

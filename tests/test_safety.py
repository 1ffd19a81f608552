"""Opening a merged file or a spec never runs code the file chose (issue 14), and CI gates cannot be fooled."""
from __future__ import annotations

import errno
import os
import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from zipcli import ZipitError, load_merged, load_spec
from zipcli.cli import app
from zipcli.merged import read_metadata, write_atomic
from zipcli.specs import BUILTIN_DIR, parse_spec

from conftest import handled, make_images, resnet20_pair, save_checkpoint

runner = CliRunner()


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    calib = make_images(root / "calib", 12, 32, seed=2)
    data = make_images(root / "data", 4, 32, seed=4, classes=["a0", "a1", "b0", "b1", "b2"])
    a, b = resnet20_pair(root, calib)
    out = root / "m.safetensors"
    r = runner.invoke(app, ["merge", str(a), str(b), "--arch", "resnet20", "--calib", str(calib), "--method",
                            "permute", "-o", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    return {"root": root, "file": out, "data": data, "calib": calib, "paths": [a, b]}


def _rewrite(src: Path, dst: Path, edit_spec=None, **meta_changes) -> Path:
    """A copy of a merged file with its stored spec (a dict) or other metadata edited."""
    meta = dict(read_metadata(src))
    if edit_spec is not None:
        doc = yaml.safe_load(meta["spec"])
        edit_spec(doc)
        meta["spec"] = yaml.safe_dump(doc)
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in meta_changes.items()})
    save_file(load_file(str(src)), str(dst), metadata=meta)
    return dst


def _hostile(marker: Path):
    def edit(doc):
        doc["builder"] = "subprocess:run"
        doc["kwargs"] = {"args": f"touch {marker}", "shell": True}
        doc["num_classes_arg"] = "check"
    return edit


def test_a_hostile_merged_file_runs_nothing_through_the_cli_or_the_api(merged, tmp_path):
    marker = tmp_path / "PWNED"
    bad = _rewrite(merged["file"], tmp_path / "bad.safetensors", _hostile(marker))
    for args in (["inspect", str(bad)], ["eval", str(bad), "--data", str(merged["data"])],
                 ["inspect", str(bad), "--json"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and handled(r), r.output
        assert "subprocess:run" in r.stderr and "--trust-builder subprocess" in r.stderr
        assert len([line for line in r.stderr.splitlines() if line.strip()]) <= 3
    with pytest.raises(ZipitError, match="not trusted"):
        load_merged(bad)
    assert not marker.exists()


def test_a_hostile_spec_runs_nothing_through_the_cli_or_the_api(merged, tmp_path):
    marker = tmp_path / "PWNED"
    doc = yaml.safe_load((BUILTIN_DIR / "resnet20.yaml").read_text())
    _hostile(marker)(doc)
    spec = tmp_path / "evil.yaml"
    spec.write_text(yaml.safe_dump(doc))
    for args in (["specs", "check", str(spec)],
                 ["merge", *map(str, merged["paths"]), "--spec", str(spec), "--calib", str(merged["calib"]),
                  "-o", str(tmp_path / "o.safetensors")],
                 ["eval", *map(str, merged["paths"]), "--spec", str(spec), "--data", str(merged["data"])]):
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and handled(r) and "not trusted" in r.stderr, r.output
    with pytest.raises(ZipitError, match="not trusted"):
        load_spec(path=spec)
    assert not marker.exists() and not (tmp_path / "o.safetensors").exists()


def test_trusting_a_module_is_one_explicit_step(merged, tmp_path, monkeypatch):
    (tmp_path / "mymodels_safety.py").write_text(textwrap.dedent("""
        from zipcli.models import cifar_resnet20

        def small_cnn(num_classes=10, width=1):
            return cifar_resnet20(width=width, num_classes=num_classes)
    """))
    monkeypatch.chdir(tmp_path)
    own = _rewrite(merged["file"], tmp_path / "own.safetensors",
                   lambda doc: doc.update(builder="mymodels_safety:small_cnn"))
    r = runner.invoke(app, ["inspect", str(own)])
    assert r.exit_code == 2 and "--trust-builder mymodels_safety" in r.stderr
    assert runner.invoke(app, ["inspect", str(own), "--trust-builder", "mymodels_safety"]).exit_code == 0
    assert len(load_merged(own, trust_builders=["mymodels_safety"]).heads) == 2
    assert "--trust-builder" in runner.invoke(app, ["merge", "--help"]).output


def test_builtin_and_torchvision_builders_are_trusted_without_asking():
    from zipcli.specs import builtin_spec_names
    from zipcli.specs.trust import trusted_by_zipit

    for name in builtin_spec_names():      # the built-ins are loaded without the check: they must pass it
        assert trusted_by_zipit(load_spec(name).builder), name
    assert parse_spec((BUILTIN_DIR / "resnet18.yaml").read_text()).builder == "torchvision.models:resnet18"


@pytest.mark.parametrize("edit, words", [
    (lambda d: d["kwargs"].update(widht=2), ["takes no argument 'widht'"]),
    (lambda d: d["kwargs"].update(width={"nested": 1}), ["kwargs.width", "not plain data"]),
    (lambda d: d.update(builder="torchvision.models:resnet18", kwargs={"weights": "IMAGENET1K_V1"}),
     ["kwargs.weights", "download"]),
    (lambda d: d.update(builder="os:system"), ["'os:system' is not trusted"]),
    (lambda d: d.update(builder="torchvision.models:get_weight"), ["not trusted"]),
    (lambda d: d.update(builder="builtins:eval"), ["not trusted"]),
])
def test_stored_spec_values_are_checked_before_anything_runs(merged, tmp_path, edit, words):
    bad = _rewrite(merged["file"], tmp_path / "bad.safetensors", edit)
    with pytest.raises(ZipitError) as info:
        load_merged(bad)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_yaml_aliases_are_refused_at_once():
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    with pytest.raises(ZipitError, match="aliases"):
        parse_spec(laughs + "format: 1\n")


def test_a_spec_that_does_not_fit_the_tensors_is_refused_before_the_model_is_built(merged, tmp_path):
    wide = _rewrite(merged["file"], tmp_path / "wide.safetensors", lambda d: d["kwargs"].update(width=100000))
    with pytest.raises(ZipitError, match="do not match the stored spec"):
        load_merged(wide)            # built on the meta device first: a 6.4M-channel model costs nothing
    many = _rewrite(merged["file"], tmp_path / "many.safetensors",
                    heads=[{"name": f"h{i}", "classes": ["x"]} for i in range(100000)])
    with pytest.raises(ZipitError, match="heads"):
        load_merged(many)


def test_a_header_that_claims_more_than_the_file_holds(tmp_path):
    fake = tmp_path / "huge.safetensors"
    fake.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    r = runner.invoke(app, ["inspect", str(fake)])
    assert r.exit_code == 2 and handled(r)


def test_gates_fail_when_a_head_has_no_test_images(merged, tmp_path):
    only_a = tmp_path / "only_a"
    for cls in ("a0", "a1"):
        shutil.copytree(merged["data"] / cls, only_a / cls)
    r = runner.invoke(app, ["eval", str(merged["file"]), "--data", str(only_a), "--min-avg", "0"])
    assert r.exit_code == 1 and "head B has no test images" in r.stderr, r.output
    assert runner.invoke(app, ["eval", str(merged["file"]), "--data", str(only_a)]).exit_code == 0


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    def fill(_tmp):
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(ZipitError, match="No space left"):
        write_atomic(tmp_path / "m.safetensors", fill, force=False)
    assert list(tmp_path.iterdir()) == []


hostile_values = st.one_of(st.none(), st.booleans(), st.integers(-10**9, 10**9), st.text(max_size=20),
                           st.lists(st.text(max_size=5), max_size=3), st.dictionaries(st.text(max_size=5),
                                                                                     st.integers(), max_size=2))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(builder=st.one_of(st.sampled_from(["subprocess:run", "os:system", "builtins:exec", "zipcli.models:cifar_resnet20",
                                          "torchvision.models:resnet18", "shutil:rmtree", "x", ":", "a:b:c"]),
                         st.text(max_size=30)),
       kwargs=st.dictionaries(st.text(max_size=8), hostile_values, max_size=3),
       heads=st.one_of(hostile_values, st.lists(st.fixed_dictionaries({"name": hostile_values,
                                                                        "classes": hostile_values}), max_size=3)),
       stop=hostile_values)
def test_fuzz_hostile_metadata_never_runs_code_or_crashes(merged, tmp_path_factory, builder, kwargs, heads, stop):
    folder = tmp_path_factory.mktemp("fuzz")
    marker = folder / "PWNED"
    kwargs = {**kwargs, "args": f"touch {marker}", "shell": True, "path": str(marker)}
    bad = _rewrite(merged["file"], folder / "f.safetensors", lambda d: d.update(builder=builder, kwargs=kwargs),
                   heads=heads, stop=stop if isinstance(stop, str) else json.dumps(stop))
    try:
        load_merged(bad)
    except ZipitError:
        pass
    assert not marker.exists()


def test_every_image_mode_and_a_symlink_loop_in_the_calibration_folder(merged, tmp_path):
    import numpy as np
    from PIL import Image

    folder = make_images(tmp_path / "calib", 6, 32, seed=9)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    rgb.convert("CMYK").save(folder / "img" / "cmyk.jpg")
    rgb.convert("P").save(folder / "img" / "palette.png")
    rgb.convert("LA").save(folder / "img" / "gray_alpha.png")
    (folder / "img" / "loop").symlink_to(folder, target_is_directory=True)   # a folder that contains itself
    out = tmp_path / "m.safetensors"
    r = runner.invoke(app, ["merge", *map(str, merged["paths"]), "--arch", "resnet20", "--calib", str(folder),
                            "--method", "permute", "-o", str(out), "--quiet"])
    assert r.exit_code == 0 and handled(r), r.output
    assert json.loads(read_metadata(out)["calibration"])["num_images"] == 9


def test_two_writers_with_force_leave_one_whole_file(tmp_path):
    import threading
    import time

    target = tmp_path / "m.safetensors"
    payloads = [bytes([i]) * 3_000_000 for i in (1, 2)]

    def writer(data):
        def write(tmp):
            with open(tmp, "wb") as f:
                for k in range(0, len(data), 500_000):
                    f.write(data[k:k + 500_000])
                    time.sleep(0.01)              # interleave the two writes
        write_atomic(target, write, force=True)

    threads = [threading.Thread(target=writer, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert target.read_bytes() in payloads
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


# --- Issue 28: --force replaces an old output, never an input; --kw obeys the rules of a spec's kwargs.

@pytest.mark.parametrize("how", ["symlink", "relative"])
def test_merge_never_writes_over_an_input_even_with_force(tmp_path, calib32, how, monkeypatch):
    from conftest import resnet20_pair
    from safetensors.torch import save_file
    from zipcli.cli import app as cli_app
    a, b = resnet20_pair(tmp_path, calib32)
    if how == "symlink":                        # another name for the .pt input
        target, out = a, tmp_path / "link.safetensors"
        out.symlink_to(a)
    else:                                       # the same file, named relatively
        target, out = tmp_path / "A.safetensors", Path("A.safetensors")
        save_file(torch.load(a, weights_only=True), str(target))
    before = target.read_bytes()
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli_app, ["merge", str(target), str(b), "--arch", "resnet20", "--calib", str(calib32),
                                     "-o", str(out), "--force"])
    assert r.exit_code == 2, r.output
    assert "is the input" in r.output and "never an input" in r.output, r.output
    assert target.read_bytes() == before


def test_merge_onto_a_safetensors_input_is_refused_before_any_work(tmp_path, calib32, monkeypatch):
    from conftest import resnet20_pair
    from safetensors.torch import save_file
    from zipcli.cli import app as cli_app
    a, b = resnet20_pair(tmp_path, calib32)
    st = tmp_path / "A.safetensors"
    save_file(torch.load(a, weights_only=True), str(st))
    before = st.read_bytes()
    _no_merge(monkeypatch)
    r = CliRunner().invoke(cli_app, ["merge", str(st), str(b), "--arch", "resnet20", "--calib", str(calib32),
                                     "-o", str(st), "--force"])
    assert r.exit_code == 2 and "is the input" in r.output and "the merge ran" not in r.output, r.output
    assert st.read_bytes() == before


def test_export_never_replaces_the_merged_file_it_reads(tmp_path, calib32):
    from conftest import resnet20_pair
    from zipcli import MergeOptions, load_spec, merge
    from zipcli.cli import app as cli_app
    from zipcli.errors import OutputError
    from zipcli.export import export_merged
    a, b = resnet20_pair(tmp_path, calib32)
    m = tmp_path / "m.safetensors"
    merge([a, b], load_spec("resnet20"), calib32, MergeOptions(method="permute")).save(m, card=False)
    before = m.read_bytes()
    r = CliRunner().invoke(cli_app, ["export", str(m), "-o", str(m), "--format", "pt2", "--force"])
    assert r.exit_code == 2 and "is the input" in r.output, r.output
    with pytest.raises(OutputError, match="is the input"):
        export_merged(m, m, "pt2", force=True)
    assert m.read_bytes() == before


def _no_merge(monkeypatch):
    """Make any merge fail loudly: what is checked before the work must not need it."""
    import zipcli.pipeline

    def merge(*args, **kwargs):
        raise AssertionError("the merge ran")

    monkeypatch.setattr(zipcli.pipeline, "merge", merge)


def test_a_missing_output_folder_is_reported_before_calibration(tmp_path, calib32, monkeypatch):
    from conftest import resnet20_pair
    from zipcli.cli import app as cli_app
    a, b = resnet20_pair(tmp_path, calib32)
    _no_merge(monkeypatch)
    r = CliRunner().invoke(cli_app, ["merge", str(a), str(b), "--arch", "resnet20", "--calib", str(calib32),
                                     "-o", str(tmp_path / "nowhere" / "m.safetensors")])
    assert r.exit_code == 2 and "does not exist" in r.output and "the merge ran" not in r.output, r.output


@pytest.mark.parametrize("command", [["specs", "trace", "resnet18"], ["specs", "check", "resnet18"]])
@pytest.mark.parametrize("kw", ["weights=DEFAULT", "pretrained=true", "weights_backbone=IMAGENET1K_V1"])
def test_kw_cannot_ask_a_builder_to_download(command, kw, monkeypatch):
    import torch.hub
    from zipcli.cli import app as cli_app

    def no_downloads(*args, **kwargs):
        raise AssertionError("a download was started")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_downloads)
    r = CliRunner().invoke(cli_app, [*command, "--kw", kw])
    assert r.exit_code == 2 and "never downloads" in r.output and "was started" not in r.output, r.output


def test_names_from_files_are_shown_with_control_characters_written_out(tmp_path, calib32, monkeypatch):
    """A head, class or file name can hold terminal escapes (retitle the window, clear the screen) or a
    bidirectional override: every command and the card write them out instead of sending them."""
    import io
    from rich.console import Console
    import zipcli.cli
    import zipcli.cli_sweep
    import zipcli.console
    from conftest import make_images, random_model, save_checkpoint, small_spec
    from zipcli.cli import app as cli_app

    buffer = io.StringIO()
    console = Console(file=buffer, width=200, force_terminal=False, highlight=False)   # no styling codes of its own
    for module in (zipcli.console, zipcli.cli, zipcli.cli_sweep):
        for name in ("err", "out"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, console)
    evil = "\x1b]0;owned\x07\x1b[2J"
    spec = small_spec("resnet20")
    a = save_checkpoint(tmp_path / f"A{evil}.pt", random_model(spec, 2, 1, calib32).state_dict(),
                        [f"cat{evil}", "dog\u202e"])
    b = save_checkpoint(tmp_path / "B.pt", random_model(spec, 3, 2, calib32).state_dict(), ["x", "y", "z"])
    data = make_images(tmp_path / "data", 10, 32, seed=5, classes=[f"cat{evil}", "dog\u202e", "x", "y", "z"])
    out = tmp_path / "m.safetensors"
    runner = CliRunner()
    results = [runner.invoke(cli_app, ["merge", str(a), str(b), "--arch", "resnet20", "--calib", str(calib32),
                                       "--method", "permute", "-o", str(out)]),
               runner.invoke(cli_app, ["inspect", str(out)]),
               runner.invoke(cli_app, ["inspect", str(a)]),
               runner.invoke(cli_app, ["eval", str(out), "--data", str(data)]),
               runner.invoke(cli_app, ["inspect", str(tmp_path / f"missing{evil}.safetensors")])]
    assert [r.exit_code for r in results] == [0, 0, 0, 0, 2], [r.output for r in results]
    text = buffer.getvalue() + "".join(r.output for r in results)
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text
    assert "\\x1b]0;owned\\x07\\x1b[2J" in text and "dog\\u202e" in text
    card = (tmp_path / "m.md").read_text()
    assert "\x1b" not in card and "\u202e" not in card and "cat\\x1b]0;owned" in card


# --- Issue 28: wrong or missing errors. Each ends in exit 2 with the culprit named, never "internal error".

def _refused(args, *words):
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and handled(r) and "internal error" not in r.output, r.output
    for word in words:
        assert word in r.output, (word, r.output)
    return r


def _merge_args(merged, *paths, extra=()):
    return ["merge", *map(str, paths or merged["paths"]), "--arch", "resnet20", "--calib", str(merged["calib"]),
            "--method", "permute", *extra, "-o", str(merged["root"] / "never.safetensors")]


def _state(merged):
    return torch.load(merged["paths"][1], weights_only=True)


def test_a_checkpoint_of_meta_tensors(merged, tmp_path):
    path = tmp_path / "meta.pt"
    torch.save({k: torch.empty_like(v, device="meta") for k, v in _state(merged).items()}, path)
    _refused(_merge_args(merged, merged["paths"][0], path), "meta.pt", "has no data")


def test_a_sidecar_nested_100000_deep(merged, tmp_path):
    path = save_checkpoint(tmp_path / "deep.pt", _state(merged))
    path.with_suffix(".json").write_text('{"classes": ' + "[" * 100_000 + "]" * 100_000 + "}")
    _refused(_merge_args(merged, merged["paths"][0], path), "deep.json", "nests too deeply")


def test_a_metadata_value_nested_100000_deep(merged, tmp_path):
    deep = _rewrite(merged["file"], tmp_path / "deep.safetensors", sources="[" * 100_000 + "]" * 100_000)
    _refused(["inspect", str(deep)], "deep.safetensors", "nested too deeply")


@pytest.mark.parametrize("seed", [str(2**70), "-1"])
def test_a_seed_beyond_64_bits(merged, seed):
    _refused(_merge_args(merged, extra=("--seed", seed)), "seed", "2^63")


def test_average_with_the_refit_on_a_folder_without_a_readable_image(merged, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"{i}.png").write_bytes(b"not an image")
    _refused(["merge", *map(str, merged["paths"]), "--arch", "resnet20", "--calib", str(bad), "--method", "average",
              "--refit", "lsq", "-o", str(tmp_path / "m.safetensors")], "no calibration image could be read")
    assert not (tmp_path / "m.safetensors").exists()


def test_a_file_name_that_is_not_utf8_is_refused_before_any_image_is_read(merged, tmp_path, monkeypatch):
    import zipcli.measured
    name = os.fsdecode(b"caf\xe9.pt")
    path = save_checkpoint(tmp_path / name, _state(merged))
    monkeypatch.setattr(zipcli.measured, "list_images", lambda *a: pytest.fail("images were listed"))
    _refused(_merge_args(merged, merged["paths"][0], path), "not valid UTF-8", "rename")


def test_a_classifier_with_no_outputs(merged, tmp_path):
    state = _state(merged)
    state["linear.weight"], state["linear.bias"] = state["linear.weight"][:0], state["linear.bias"][:0]
    path = save_checkpoint(tmp_path / "empty.pt", state)
    _refused(_merge_args(merged, merged["paths"][0], path), "empty.pt", "0 outputs")


def test_a_class_named_twice_in_one_head(merged, tmp_path):
    path = save_checkpoint(tmp_path / "twice.pt", _state(merged), ["b0", "b1", "b0"])
    _refused(_merge_args(merged, merged["paths"][0], path), "twice.json", "'b0' is named twice")
    _refused(_merge_args(merged, extra=("--classes", "a0,a1", "--classes", "x,y,x")), "'x' is named twice")


def test_non_finite_weights_in_a_merged_file_are_refused_and_never_exported(merged, tmp_path):
    from zipcli import load_merged
    from zipcli.errors import MergedFileError
    from zipcli.export import _relative_gap
    tensors = load_file(str(merged["file"]))
    tensors["trunk.conv1.weight"] = torch.full_like(tensors["trunk.conv1.weight"], float("nan"))
    nan = tmp_path / "nan.safetensors"
    save_file(tensors, str(nan), metadata=read_metadata(merged["file"]))
    with pytest.raises(MergedFileError, match="NaN or Inf"):
        load_merged(nan)
    _refused(["export", str(nan), "-o", str(tmp_path / "nan.pt2")], "NaN or Inf")
    assert not (tmp_path / "nan.pt2").exists()
    assert _relative_gap([torch.tensor([float("nan")])], [torch.tensor([float("nan")])]) == float("inf")


def test_eval_gives_its_figures_and_gate_when_the_card_cannot_be_written(merged, monkeypatch):
    import zipcli.card
    from zipcli.errors import OutputError

    def read_only(*_a, **_k):
        raise OutputError(f"cannot write in {str(merged['root'])!r}: Read-only file system", "choose a writable folder")

    monkeypatch.setattr(zipcli.card, "record_accuracy", read_only)
    r = runner.invoke(app, ["eval", str(merged["file"]), "--data", str(merged["data"]), "--min-avg", "0"])
    assert r.exit_code == 0, r.output
    assert "average per task" in r.output and "card was not updated" in r.output and "Read-only" in r.output


def test_eval_batch_size_zero(merged):
    _refused(["eval", str(merged["file"]), "--data", str(merged["data"]), "--batch-size", "0"], "--batch-size 0")


@pytest.mark.parametrize("text", ["cat\ndog\n", "classes = 3\n"])
def test_a_plain_text_pt_is_not_called_a_dangerous_pickle(merged, tmp_path, text):
    path = tmp_path / "notes.pt"
    path.write_text(text)
    r = _refused(_merge_args(merged, merged["paths"][0], path), "notes.pt", "not a torch checkpoint")
    assert "run code" not in r.output


def test_load_merged_of_a_checkpoint_says_what_it_is(merged):
    from zipcli import load_merged
    from zipcli.errors import MergedFileError
    with pytest.raises(MergedFileError, match="a torch checkpoint, not a merged file"):
        load_merged(merged["paths"][0])


def test_compiled_data_parallel_prefixes_are_stripped_in_either_order(merged, tmp_path):
    from zipcli.checkpoints import read_state_dict
    state = _state(merged)
    for prefix in ("_orig_mod.module.", "module._orig_mod."):
        path = tmp_path / "wrapped.pt"
        torch.save({prefix + k: v for k, v in state.items()}, path)
        assert read_state_dict(path).keys() == state.keys()


@pytest.mark.parametrize("field, value", [("method", "zipt"), ("refit", "lbfgs"), ("dtype", "float8")])
def test_merge_options_refuse_an_unknown_name_where_it_is_written(field, value):
    from zipcli import MergeOptions
    with pytest.raises(ZipitError, match=f"unknown {field} '{value}'"):
        MergeOptions(**{field: value})


# --- Issue 28: unbounded reads are refused before anything is allocated.

def test_a_checkpoint_archive_that_inflates_to_gigabytes_is_refused_from_its_directory(merged, tmp_path, monkeypatch):
    import zipfile
    import zipcli.checkpoints
    bomb = tmp_path / "bomb.pt"
    torch.save(_state(merged), bomb)
    with zipfile.ZipFile(bomb, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("bomb/data/huge", b"\0" * (200 * 2**20))    # 200 MiB of zeros, a few hundred kB deflated
    assert bomb.stat().st_size < 2 * 2**20
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: pytest.fail("the archive was unpickled")
                        if str(f) == str(bomb) else real(f, *a, **k))
    _refused(_merge_args(merged, merged["paths"][0], bomb), "bomb.pt", "would inflate to 0.2 GiB")
    assert zipcli.checkpoints.INFLATE_SLACK < 200 * 2**20


def test_a_spec_that_is_a_pipe_is_refused_without_reading(merged, tmp_path):
    fifo = tmp_path / "spec.yaml"
    os.mkfifo(fifo)                                  # opening it would wait for a writer forever
    _refused(["merge", *map(str, merged["paths"]), "--spec", str(fifo), "--calib", str(merged["calib"])],
             "spec.yaml", "not a regular file")
    _refused(["specs", "check", str(fifo)], "spec.yaml")

"""The model card and config written beside every merge: complete, parseable, and all-or-nothing."""
from __future__ import annotations

import errno
import json
import shlex

import pytest
from typer.testing import CliRunner

from zipcli.cli import app
from zipcli.errors import ZipitError
from zipcli.merged import read_metadata, write_all_atomic

from conftest import make_images, resnet20_pair

runner = CliRunner()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    calib = make_images(root / "calib", 12, 32, seed=2)
    a, b = resnet20_pair(root, calib, (["cat", "dog"], ["car", "bus", "van"]))
    return {"a": a, "b": b, "calib": calib}


def _merge(pair, out, *extra):
    return runner.invoke(app, ["merge", str(pair["a"]), str(pair["b"]), "--arch", "resnet20", "--calib",
                               str(pair["calib"]), "--method", "permute", "--stop", "layer2", "-o", str(out),
                               "--quiet", *extra])


def test_card_and_config_are_complete_and_parse(pair, tmp_path):
    out = tmp_path / "m.safetensors"
    assert _merge(pair, out).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.config.json", "m.md", "m.safetensors"]
    meta = read_metadata(out)
    config = json.loads((tmp_path / "m.config.json").read_text())
    assert config["architecture"] == "resnet20" and config["stop"] == "layer2" and config["method"] == "permute"
    assert [h["id2label"] for h in config["heads"]] == [{"0": "cat", "1": "dog"}, {"0": "car", "1": "bus", "2": "van"}]
    assert config["heads"][1]["label2id"] == {"car": 0, "bus": 1, "van": 2}
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, 32, 32] and cfg["mean"] == [0.4914, 0.4822, 0.4465] and cfg["crop_pct"] == 1.0
    assert [s["sha256"] for s in config["sources"]] == [s["sha256"] for s in json.loads(meta["sources"])]
    card = (tmp_path / "m.md").read_text()
    for needed in ("layer2", "permute", "cat, dog", "car, bus, van", "zipit eval m.safetensors",
                   "zipcli.load_merged", *[s["sha256"] for s in config["sources"]]):
        assert needed in card, needed
    command = shlex.split(card.split("```bash\n")[1].split("\n```")[0])
    assert command[:2] == ["zipit", "merge"] and command[-2:] == ["-o", str(out)]
    again = tmp_path / "again" / "m.safetensors"                   # the card's command makes the same file
    again.parent.mkdir()
    r = runner.invoke(app, [*command[1:-1], str(again), "--quiet", "--no-card"])
    assert r.exit_code == 0, r.output
    assert again.read_bytes() == out.read_bytes()


def test_no_card_writes_only_the_model_and_an_existing_card_needs_force(pair, tmp_path):
    out = tmp_path / "m.safetensors"
    assert _merge(pair, out, "--no-card").exit_code == 0
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    (tmp_path / "m.md").write_text("mine")
    r = _merge(pair, tmp_path / "m.safetensors", "--force")
    assert r.exit_code == 0 and (tmp_path / "m.md").read_text() != "mine"
    other = tmp_path / "other.safetensors"
    (tmp_path / "other.md").write_text("notes")
    r = _merge(pair, other)
    assert r.exit_code == 2 and "other.md" in r.stderr and not other.exists()
    assert (tmp_path / "other.md").read_text() == "notes"


def test_the_set_is_written_whole_or_not_at_all(tmp_path):
    def ok(tmp):
        open(tmp, "w").write("x")

    def full(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    items = [(tmp_path / "m.safetensors", ok, ".tmp"), (tmp_path / "m.md", ok, ".tmp"),
             (tmp_path / "m.config.json", full, ".tmp")]
    with pytest.raises(ZipitError, match="No space left"):
        write_all_atomic(items, force=False)
    assert list(tmp_path.iterdir()) == []

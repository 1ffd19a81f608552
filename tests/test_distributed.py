"""A merge in 2 processes (gloo on this CPU) equals the merge in one; a failure on one rank ends both."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from zipcli import MergeOptions, SilentReporter, load_spec, merge
from zipcli.distributed import Ranks

from conftest import make_images, resnet20_pair


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    calib = make_images(root / "calib", 150, 32, seed=3)      # 120 sampled + spare images to hold out
    a, b = resnet20_pair(root, calib)
    return {"root": root, "a": a, "b": b, "calib": calib}


# The refit samples positions and cross-validation folds within each process's shard, so only merges
# without it equal the one-process merge up to rounding (its own test below checks every rank agrees).
OPTIONS = {"permute": dict(method="permute", num_calib=120, batch_size=16, stop="layer2", refit="none"),
           "default": dict(num_calib=120, batch_size=16, stop="layer2", refit="none")}


def _worker(rank: int, world: int, port: int, pair: dict, options: dict, out: str, fail_rank: int | None):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import zipcli.measured
    from zipcli.distributed import leave, ranks_from_env
    from zipcli.errors import ZipitError, CalibrationError

    ranks = ranks_from_env("cpu")
    if rank == fail_rank:               # a failure that only this rank meets, in the middle of the job
        def broken(*_args, **_kwargs):
            raise CalibrationError("shard unreadable", "check the images")
        zipcli.measured.collect_correlations = broken
    outcome = {"rank": rank}
    try:
        result = merge([pair["a"], pair["b"]], load_spec("resnet20"), pair["calib"], MergeOptions(**options),
                       SilentReporter(), ranks)
        if ranks.main:
            result.save(Path(out) / "merged.safetensors", card=False)
        outcome["metadata"] = {k: result.metadata[k] for k in ("params", "calibration", "spaces")}
    except ZipitError as exc:
        outcome["error"], outcome["code"] = exc.message, exc.exit_code
    finally:
        leave(ranks)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(outcome))


def _run(pair, options: dict, out: Path, fail_rank: int | None = None) -> list[dict]:
    mp.start_processes(_worker, args=(2, _free_port(), {k: str(v) for k, v in pair.items()}, options, str(out),
                                      fail_rank), nprocs=2, start_method="spawn", join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def assert_same_up_to_rounding(got, want, where="params"):
    """Equal structures, names, choices and counts; floats equal up to rounding (the sums over two
    shards add in another order, so a stored score may differ in its last digit)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for key in want:
            assert_same_up_to_rounding(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same_up_to_rounding(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(got, bool):
        assert got == pytest.approx(want, rel=1e-3, abs=1e-5), where
    else:
        assert got == want, where


def test_rounding_comparison_tells_a_last_digit_from_a_different_choice():
    assert_same_up_to_rounding({"score": 0.0035, "pick": "zipit"}, {"score": 0.003501, "pick": "zipit"})
    for other in ({"score": 0.0035, "pick": "permute"}, {"score": 0.0045, "pick": "zipit"}, {"score": 0.0035}):
        with pytest.raises(AssertionError):
            assert_same_up_to_rounding(other, {"score": 0.003501, "pick": "zipit"})


@pytest.mark.parametrize("name", list(OPTIONS))
def test_two_processes_give_the_single_process_merge(pair, name, tmp_path):
    single = merge([pair["a"], pair["b"]], load_spec("resnet20"), pair["calib"], MergeOptions(**OPTIONS[name]),
                   SilentReporter())
    outcomes = _run(pair, OPTIONS[name], tmp_path)
    assert all("error" not in o for o in outcomes), outcomes
    assert outcomes[0]["metadata"] == outcomes[1]["metadata"]          # every rank ends with the same merge
    meta = outcomes[0]["metadata"]
    assert meta["calibration"] == single.metadata["calibration"]                   # the images of both shards
    assert_same_up_to_rounding(meta["params"], json.loads(json.dumps(single.metadata["params"])))  # same choice
    for got, want in zip(meta["spaces"], single.metadata["spaces"]):
        assert got["within_share"] == want["within_share"]
        assert got["mean_corr"] == pytest.approx(want["mean_corr"], abs=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.safetensors", "rank0.json", "rank1.json"]
    single.save(tmp_path / "single.safetensors", card=False)
    weights, expected = load_file(tmp_path / "merged.safetensors"), load_file(tmp_path / "single.safetensors")
    assert weights.keys() == expected.keys()
    for key, value in weights.items():
        torch.testing.assert_close(value, expected[key], rtol=1e-4, atol=1e-5, msg=key)


def test_the_refit_in_two_processes_solves_every_rank_alike(pair, tmp_path):
    """Each rank refits on its own shard; the statistics are summed, so every rank solves the same layers."""
    outcomes = _run(pair, dict(OPTIONS["permute"], refit="lsq"), tmp_path)
    assert all("error" not in o for o in outcomes), outcomes
    assert outcomes[0]["metadata"] == outcomes[1]["metadata"]
    refit = outcomes[0]["metadata"]["params"]["refit"]
    assert refit["layers"] > 0 and refit["layers"] > refit["kept_zipped"]


def test_a_failure_on_one_rank_ends_both_with_its_message_and_no_file(pair, tmp_path):
    outcomes = _run(pair, OPTIONS["permute"], tmp_path, fail_rank=1)
    assert outcomes[1]["error"] == "shard unreadable"
    assert outcomes[0]["error"] == "rank 1 of 2: shard unreadable" and outcomes[0]["code"] == 2
    assert not (tmp_path / "merged.safetensors").exists()


def test_shards_are_contiguous_whole_batches_without_padding():
    for n in (1, 7, 64, 100, 129):
        for world in (1, 2, 3, 5):
            shards = [Ranks(r, world).shard(list(range(n)), 16) for r in range(world)]
            assert sum(shards, []) == list(range(n))                      # none twice, none dropped, in order
            assert all(len(s) % 16 == 0 for s in shards[:-1] if s)        # batches as in one process


def test_torchrun_merge_writes_once_from_rank_0(pair, tmp_path):
    out = tmp_path / "m.safetensors"
    args = ["merge", str(pair["a"]), str(pair["b"]), "--arch", "resnet20", "--calib", str(pair["calib"]),
            "--method", "permute", "--refit", "none", "--num-calib", "120", "--batch-size", "16", "--stop", "layer2",
            "-o", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "zipcli", *args], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.count("wrote ") == 1, r.stderr                       # one summary, from rank 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.config.json", "m.md", "m.safetensors"]
    alone = tmp_path / "alone.safetensors"
    r1 = subprocess.run([sys.executable, "-m", "zipcli", *args[:-1], str(alone), "--no-card", "-q"],
                        capture_output=True, text=True, timeout=600)
    assert r1.returncode == 0, r1.stderr
    a, b = load_file(out), load_file(alone)
    for key in b:
        np.testing.assert_allclose(a[key].numpy(), b[key].numpy(), rtol=1e-4, atol=1e-5, err_msg=key)


def _stray(pair, tmp_path, timeout: str) -> subprocess.Popen:
    """A merge whose environment says it is rank 0 of 2, with no rank 1 anywhere."""
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "ZIPIT_JOIN_TIMEOUT": timeout}
    return subprocess.Popen([sys.executable, "-m", "zipcli", "merge", str(pair["a"]), str(pair["b"]), "--arch",
                             "resnet20", "--calib", str(pair["calib"]), "-o", str(tmp_path / "m.safetensors")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_stray_torchrun_environment_says_what_it_waits_for_and_gives_up(pair, tmp_path):
    proc = _stray(pair, tmp_path, "3")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert "joining 2 processes at 127.0.0.1" in err and "no other process joined within 3 s" in err
    assert "unset WORLD_SIZE and RANK" in err and not (tmp_path / "m.safetensors").exists()


def test_a_stray_torchrun_environment_ends_on_sigterm_while_it_waits(pair, tmp_path):
    import signal
    import time
    import select
    proc = _stray(pair, tmp_path, "600")
    ready, _, _ = select.select([proc.stderr], [], [], 60)   # the old code said nothing while it waited
    line = proc.stderr.readline() if ready else ""
    if not ready:
        proc.kill()
    assert "joining 2 processes" in line, line
    time.sleep(1)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "Traceback" not in err, err
    assert time.monotonic() - started < 60          # not the 600 s of the join, nor torch's 30 minutes

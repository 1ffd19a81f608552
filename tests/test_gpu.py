"""--device cuda produces the same merge as the CPU (run where a CUDA device exists)."""
from __future__ import annotations

import pytest
import torch

from zipcli import MergeOptions, merge

from conftest import random_model, save_checkpoint, small_spec

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def test_cuda_merge_matches_cpu(tmp_path, calib32):
    spec = small_spec("resnet20")
    a = save_checkpoint(tmp_path / "a.pt", random_model(spec, 3, 1, calib32).state_dict())
    b = save_checkpoint(tmp_path / "b.pt", random_model(spec, 4, 2, calib32).state_dict())
    cpu = merge([a, b], spec, calib32, MergeOptions(stop="layer2"))
    gpu = merge([a, b], spec, calib32, MergeOptions(stop="layer2", device="cuda"))
    assert all(p.device.type == "cuda" for p in gpu.model.parameters())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        for c, g in zip(cpu.model(x), gpu.model(x.cuda())):
            torch.testing.assert_close(g.cpu(), c, rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="nccl needs one CUDA device per process")
def test_torchrun_on_two_gpus_matches_one_cpu_process(tmp_path, calib32):
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    spec = small_spec("resnet20")
    a = save_checkpoint(tmp_path / "a.pt", random_model(spec, 3, 1, calib32).state_dict())
    b = save_checkpoint(tmp_path / "b.pt", random_model(spec, 4, 2, calib32).state_dict())
    args = ["merge", str(a), str(b), "--arch", "resnet20", "--calib", str(calib32), "--method", "permute",
            "--refit", "none", "--batch-size", "8", "--stop", "layer2", "--no-card", "-q"]   # the refit samples per shard
    gpus = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "zipcli", *args, "--device", "cuda", "-o", str(tmp_path / "gpu.safetensors")],
                          capture_output=True, text=True, env=dict(os.environ), timeout=600)
    assert gpus.returncode == 0, gpus.stderr[-2000:]
    cpu = subprocess.run([sys.executable, "-m", "zipcli", *args, "-o", str(tmp_path / "cpu.safetensors")],
                         capture_output=True, text=True, timeout=600)
    assert cpu.returncode == 0, cpu.stderr[-2000:]
    g, c = load_file(tmp_path / "gpu.safetensors"), load_file(tmp_path / "cpu.safetensors")
    for key in c:
        torch.testing.assert_close(g[key], c[key], rtol=1e-3, atol=1e-3, msg=key)

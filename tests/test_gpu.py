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

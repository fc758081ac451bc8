"""`bench/gpu_check.py` without CUDA: one clear skip line, exit status 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the script runs")
def test_skips_cleanly_without_cuda():
    res = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("skip: no CUDA device"), res.stdout
    assert "CUDA build of torch" in lines[0]


@pytest.mark.slow
def test_smoke_runs_the_gpu_code_path_on_cpu_with_peers():
    """`--smoke`: parity, scale and the peers.py run (its smoke shape, CPU float32: every output
    equal) through the same functions as on a GPU; both tables printed."""
    import json

    res = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--json"], capture_output=True,
                         text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert lines[-1].startswith("gpu_check: PASS")
    report = json.loads(lines[-2])
    assert any(line.split()[:3] == ["smoke", "bf16", "updates"] for line in lines)
    peers = report["peers"]
    assert peers["command"][2:5] == ["--smoke", "--device", "cpu"]
    if peers["report"] is None:                      # the shared Qwen data is absent: one skip line
        assert len(peers["table"]) == 1 and peers["table"][0].startswith("skip:")
        return
    assert {r["job"] for r in peers["report"]["rows"]} == {"cache", "lhat", "updates"}
    assert all(r["equal"] for r in peers["report"]["rows"])
    assert peers["table"][1].startswith("job") and all(line in lines for line in peers["table"])

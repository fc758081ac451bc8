"""`bench/peers.py --smoke`: every job's project and peer outputs agree (T = 64, d_model 32)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "peers.py"
SHARED = ROOT.parent / "shared" / "data"

PEERS = {
    "cache": {"TransformerLens run_with_cache + h5py"},
    "lhat": {"HF KV-cache reuse (crop per prefix)", "RaML per-prefix re-run"},
    "anchors": {"Thought Anchors (full eager patterns)"},
    "updates": {"autograd backward per token"},
}


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "tokenizers" / "qwen" / "vocab.json").is_file()
                    or not (SHARED / "traces" / "r1-distill-qwen-1.5b-math.jsonl").is_file(),
                    reason=f"the real Qwen tokenizer / R1 traces are not under {SHARED}")
def test_smoke_every_peer_equals_the_project():
    res = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--json"], capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    rows = report["rows"]
    assert {(r["job"], r["peer"]) for r in rows} == {(j, p) for j, ps in PEERS.items() for p in ps}
    assert all(r["T"] == 64 for r in rows)
    bad = [(r["job"], r["peer"], r["max_diff"]) for r in rows if not r["equal"]]
    assert not bad
    assert report["skips"] and report["skips"][0].startswith("skip: nnsight:")
    assert report["skips"][0] in lines

"""`torchrun --nproc-per-node 2 -m probes.run cache ...` on CPU: one store, equal to one process.

Each rank writes its own segments (shard r0 / r1) into `--out`; rank 0 writes the index. The store
must equal a single-process run dataset by dataset, bit for bit, read through `open_cache` and
through plain h5py; a resume after a rank lost work redoes only that work.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from cache import segments_dir
from probes.demo.run import SAMPLE_TRACES
from probes.errors import ProbesError
from probes.pipeline.shards import Shard, current_shard
from probes.run import main
from tests.probes.commands._store_snapshot import snapshot

ROOT = Path(__file__).resolve().parents[3]
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(traces: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run(
        [str(TORCHRUN), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
         str(_free_port()), "-m", "probes.run", "cache", "--model", "tiny-reasoner", "--traces",
         str(traces), "--out", str(out), "--device", "cpu", "--no-progress", *extra],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_current_shard_reads_the_torchrun_environment():
    assert current_shard({}) is None
    assert current_shard({"WORLD_SIZE": "1", "RANK": "0"}) is None
    shard = current_shard({"WORLD_SIZE": "3", "RANK": "2"})
    assert shard == Shard(rank=2, world=3, local_rank=2) and shard.name == "r2"
    assert shard.take(list(range(8))) == [2, 5]
    with pytest.raises(ProbesError, match="RANK=3 is not in"):
        current_shard({"WORLD_SIZE": "2", "RANK": "3"})
    with pytest.raises(ProbesError, match="not integers"):
        current_shard({"WORLD_SIZE": "two"})


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason=f"no torchrun next to {sys.executable}")
@pytest.mark.parametrize(("n_traces", "batch_tokens"), [(3, "0"), (9, "250")])
def test_two_ranks_write_one_store_equal_to_one_process(tmp_path, capsys, monkeypatch, n_traces,
                                                        batch_tokens):
    """One commit per trace (`--batch-tokens 0`), and short traces in groups (several per
    forward, one commit per group): the ranks take whole groups, so every trace runs in the same
    forward as in one process and the store is bit for bit the same."""
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    traces = tmp_path / "few.jsonl"
    traces.write_text("".join(SAMPLE_TRACES.read_text().splitlines(keepends=True)[:n_traces]))
    single, dist = tmp_path / "single.h5", tmp_path / "dist.h5"
    assert main(["cache", "--model", "tiny-reasoner", "--traces", str(traces), "--out",
                 str(single), "--device", "cpu", "--no-progress", "--batch-tokens",
                 batch_tokens]) == 0
    capsys.readouterr()
    expected = snapshot(single)
    n_groups = len(list(segments_dir(single).glob("*.h5")))
    assert n_groups == (3 if batch_tokens == "0" else 2)

    res = _torchrun(traces, dist, "--batch-tokens", batch_tokens)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[rank 0/2]" in res.stderr and "[rank 1/2]" in res.stderr
    segments = sorted(p.name for p in segments_dir(dist).glob("*.h5"))
    assert segments == sorted(f"r{g % 2}-{g // 2 + 1:06d}.h5" for g in range(n_groups))
    assert snapshot(dist) == expected  # every dataset, attr, dtype, chunking; the same order
    with h5py.File(dist, "r") as f:  # plain h5py reads the index rank 0 wrote (no rebuild)
        assert sorted(f["meta/segments"].asstr()[()]) == segments
        name = next(iter(f["traces"]))
        assert f["traces"][name]["tokens"].shape[0] == f["traces"][name].attrs["n_tokens"]
        lost = len(h5py.File(segments_dir(dist) / "r1-000001.h5", "r")["traces"])

    # A rank lost its work (killed): its segment is gone and a temporary one is left behind;
    # --resume redoes exactly that work, on the same shard layout.
    (segments_dir(dist) / "r1-000001.h5").rename(segments_dir(dist) / "r1-000001.h5.x.tmp")
    res = _torchrun(traces, dist, "--resume", "--batch-tokens", batch_tokens)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{lost} traces written" in res.stdout and "interrupted redone" in res.stdout
    assert snapshot(dist) == expected
    shutil.rmtree(segments_dir(dist))

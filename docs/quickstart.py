"""The README's notebook quick start as a script: runs against the installed package alone.

    pip install .            # or pip install -e ".[test]"; torch first (README, "Install")
    python docs/quickstart.py

Only `import probes` is used; the traces come from the package (`probes.DATA_DIR`), the cache is
written to a temporary folder. On tiny-reasoner with 3 traces it takes a few seconds on CPU.
(pandas, the optional `tables` extra, is needed for `to_pandas()` only.)
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import probes


def main() -> None:
    model = probes.load_model("tiny-reasoner", device="cpu")

    # Traces from a JSONL path (or a list of dicts, or a datasets.Dataset).
    traces = probes.read_traces(probes.DATA_DIR / "tiny_reasoner_traces.jsonl")[:3]
    mine = probes.read_traces([{"id": "mine", "question": traces[0].question,
                                "trajectory": traces[0].trajectory, "answer": traces[0].answer}])
    same = mine[0].trajectory == traces[0].trajectory
    print(f"{len(traces)} traces; a dict reads as the same trace: {same}")

    # One trace, in memory: the L̂ curve and its per-token changes.
    curve = probes.lhat(model, traces[0])
    lhat = curve.arrays["lhat"]
    print(f"trace {curve.id}: {curve.n_tokens} tokens, L̂ {lhat[0]:.3f} -> {lhat[-1]:.5f} nats "
          f"over {len(lhat) - 1} trajectory tokens")
    try:
        table = curve.to_pandas()  # one row per token, every array aligned on it
        print(f"per-token table: {table.shape[0]} rows, columns {list(table.columns)[:7]} ...")
    except ImportError:
        print("per-token table: pandas absent (pip install 'trajectory-probes[tables]')")

    # A dataset into a resumable cache, then read back by token position.
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.h5"
        stored = probes.run_lhat(model, traces, out)
        print(f"wrote {len(stored)} traces to {out.name}")
        with probes.open_cache(out) as store:
            tr = store.trace(traces[0].id)
            at = tr.select("reflection")
            dl = tr.array("lhat_delta", at=at)
            print(f"trace {tr.id}: {len(at)} reflection tokens, their ΔL̂ sum {dl.sum():+.4f} nats; "
                  f"the whole trajectory {tr.array('lhat_delta')[...].sum():+.4f}")


if __name__ == "__main__":
    main()

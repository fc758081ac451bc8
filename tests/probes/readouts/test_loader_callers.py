"""Every reader of stored arrays goes through the one typed loader (`probes.readouts.loader`): the
readers of compare, compare_updates, efficiency, compare-models, effects, the report and the anchors
demo read a cache only via `load_traces`, and give back exactly what was stored."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from cache import open_writer
from probes.errors import ProbesError
from probes.readouts import loader

N, A, B = 20, 4, 16          # tokens, trajectory [A, B)
T, L, C, NP = B - A, 2, 3, 5  # trajectory tokens, layers, chunks, effect pairs
CODES = {"ordinary": 0, "reflection": 1, "delimiter": 2, "prompt": 3, "answer": 5}
ROOT = Path(__file__).resolve().parents[3]

READERS = ("probes/readouts/compare.py", "probes/readouts/compare_updates.py",
           "probes/readouts/efficiency.py", "probes/readouts/compare_models.py",
           "probes/readouts/effects.py", "probes/readouts/report/scan.py",
           "probes/demo/anchors.py", "probes/demo/generation.py")


def _meta():
    return {"model": "m", "architecture": {"family": "qwen2", "n_layers": L, "d_model": 4,
                                           "n_heads": 1, "n_kv_heads": 1, "d_head": 4},
            "model_dtype": "float32", "weight_convention": "hf", "tokenizer_fingerprint": "t",
            "lexicon_fingerprint": "l", "category_codes": CODES, "config": {}}


def _arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    return {
        "lhat": f(T + 1), "lhat_delta": f(T),
        "phrase_id": np.where(np.arange(N) % 5 == 0, 0, -1).astype(np.int16),
        "phrase_first": (np.arange(N) % 5 == 0).astype(np.uint8),
        "paragraph_start": (np.arange(T) % 4 == 0).astype(np.uint8),
        "upd_contrib": f(L, T), "upd_loo": f(L, T), "upd_sigma_gate": f(L, T), "upd_m7": f(L, T),
        "eff_pairs": np.stack([rng.integers(0, L, NP), rng.integers(0, T, NP)], 1).astype(np.int32),
        **{n: f(NP) for n in ("eff_pred_m7", "eff_pred_m6", "eff_dl_attn", "eff_dl_mlp")},
        "dir_proj": f(2, L, T), "dir_cos": f(2, L, T),
        "chunk_category": np.array([0, 1, 2], np.uint8), "anc_supp_dl": f(C),
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    category = np.zeros(N, np.uint8)
    category[:A] = CODES["prompt"]
    category[B:] = CODES["answer"]
    category[[A + 1, A + 6]] = CODES["reflection"]
    category[[A + 3, A + 9]] = CODES["delimiter"]
    path = tmp_path_factory.mktemp("callers") / "s.h5"
    stored = {}
    with open_writer(path, metadata=_meta()) as writer:
        for k in range(3):
            stored[f"t{k}"] = _arrays(k)
            writer.write_trace(f"t{k}", tokens=np.arange(N) + k, category=category,
                               spans={"prompt": (0, A), "trajectory": (A, B), "answer": (B, N)},
                               arrays=stored[f"t{k}"], attrs={"upd_layers": "[3, 5]"})
    return path, stored, category


@pytest.fixture
def reads(monkeypatch):
    """Trace ids read through the loader (`loader._read`), in order."""
    seen: list[str] = []
    real = loader._read

    def spy(trace, *args, **kwargs):
        seen.append(trace.id)
        return real(trace, *args, **kwargs)

    monkeypatch.setattr(loader, "_read", spy)
    return seen


IDS = ["t0", "t1", "t2"]


def test_compare_reads_curves_and_updates_through_the_loader(store, reads):
    from probes.readouts.compare import load_curves
    from probes.readouts.compare_updates import load_updates

    path, stored, category = store
    rows, _ = load_curves(path)
    assert reads == IDS
    for r in rows:
        s = stored[r["id"]]
        np.testing.assert_array_equal(r["lhat"], s["lhat"].astype(np.float64))
        np.testing.assert_array_equal(r["phrase_id"], s["phrase_id"])
        np.testing.assert_array_equal(r["paragraph_start"], s["paragraph_start"].astype(bool))
        np.testing.assert_array_equal(r["category"], category)
        assert r["traj_span"] == (A, B) and r["raml_occ"] is None
    reads.clear()
    rows = load_updates(path)
    assert reads == IDS
    for r in rows:
        s = stored[r["id"]]
        assert r["layers"] == [3, 5]
        assert sorted(r["upd"]) == ["upd_contrib", "upd_loo", "upd_m7", "upd_sigma_gate"]
        for name, v in r["upd"].items():
            np.testing.assert_array_equal(v, s[name].astype(np.float64))
        np.testing.assert_array_equal(r["tokens"], np.arange(N) + int(r["id"][1]))


def test_efficiency_and_compare_models_read_through_the_loader(store, reads):
    from probes.readouts.compare_models import _load
    from probes.readouts.efficiency import load_lhat

    path, stored, category = store
    curves = load_lhat(path)
    assert reads == IDS and list(curves) == IDS
    np.testing.assert_array_equal(curves["t1"], stored["t1"]["lhat"].astype(np.float64))
    reads.clear()
    cache = _load(path, None)
    assert reads == IDS and cache["model"] == "m" and cache["codes"] == CODES
    t = cache["traces"]["t2"]
    assert t["span"] == (A, B) and list(t["upd"]) == ["upd_sigma_gate", "upd_loo", "upd_contrib"]
    np.testing.assert_array_equal(t["category"], category[A:B])
    np.testing.assert_array_equal(t["upd"]["upd_contrib"],
                                  stored["t2"]["upd_contrib"].astype(np.float64))


def test_effects_read_through_the_loader(store, reads):
    from probes.readouts.effects import direction_summary, read_effects

    path, stored, category = store
    effects = read_effects(path)
    assert reads == IDS
    for e in effects:
        s = stored[e.trace_id]
        for name, v in e.arrays.items():
            np.testing.assert_array_equal(v, s[name])
        # each pair's category is that of its trajectory token
        names = {v: k for k, v in CODES.items()}
        assert list(e.category) == [names[int(category[A + i])] for i in s["eff_pairs"][:, 1]]
    reads.clear()
    summary = direction_summary(path)
    assert reads == IDS
    refl = [np.nanmean(stored[i]["dir_cos"][0][:, category[A:B] == 1].astype(np.float64), axis=1)
            for i in IDS]
    assert summary["reflection|reflection"]["mean_per_layer"] == \
        np.nanmean(np.stack(refl), axis=0).round(4).tolist()


def test_report_scan_and_token_views_read_through_the_loader(store, reads):
    from probes.readouts.report.scan import _scan, _token_views

    class Quiet:
        def step(self, what):
            pass

        def advance(self, n=1, *, tokens=0):
            pass

    path, stored, _ = store
    scan = _scan(path)
    assert reads == IDS and scan.ids == IDS and scan.reflective == IDS
    assert (scan.n_lhat, scan.n_updates) == (3, 3)
    assert scan.tokens["reflection"] == 6 and scan.traces_with["delimiter"] == 3
    reads.clear()
    views, keys, _ = _token_views(scan, ["t1"], Quiet())
    assert reads == ["t1"]
    np.testing.assert_array_equal(views[0].values["lhat"], stored["t1"]["lhat"][1:])
    np.testing.assert_array_equal(views[0].values["upd_m7@5"], stored["t1"]["upd_m7"][1])


def test_anchors_demo_reads_through_the_loader(store, reads):
    from probes.demo.anchors import _per_trace

    path, stored, _ = store
    out = _per_trace(path, "anc_supp_dl")
    assert reads == IDS and out["n_traces"] == 3
    tops = [float(stored[i]["anc_supp_dl"].max()) for i in IDS]
    assert out["median_anchor_value"] == float(np.median(tops))


def test_no_reader_opens_a_cache_around_the_loader():
    """The readers import no `cache.open_cache`: they read only via `probes.readouts.loader`."""
    for rel in READERS:
        tree = ast.parse((ROOT / rel).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "cache":
                assert "open_cache" not in [a.name for a in node.names], rel
        src = (ROOT / rel).read_text()
        assert "probes.readouts.loader" in src, rel


def test_optional_arrays_and_stored_names(store):
    path, stored, _ = store
    (tr,) = loader.load_traces(path, ["lhat"], traces=["t0"], optional=["upd_m7", "nope"])
    assert list(tr.arrays) == ["lhat", "upd_m7"]
    assert "dir_cos" in tr.stored and "nope" not in tr.stored
    np.testing.assert_array_equal(tr["upd_m7"], stored["t0"]["upd_m7"])
    with pytest.raises(ProbesError, match="dir_cos was not loaded"):
        tr["dir_cos"]
    with pytest.raises(ProbesError, match="has no nope"):
        tr["nope"]
    # optional never skips: a trace without one is still read
    assert [t.id for t in loader.load_traces(path, [], optional=["nope"])] == IDS

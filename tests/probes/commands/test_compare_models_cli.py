"""`compare-models` end to end: tiny-reasoner against its random-init control (L̂ and updates),
two tiny random-init models sharing a byte tokenizer, and the refusals (different tokens, ...)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from analyses.stability import STABILITY, stability_measures
from cache import open_cache
from probes.models.controls import random_init_model
from probes.models.load import boot_model, load_model
from probes.models.tiny import byte_tokenizer, tiny_config
from probes.pipeline.lhat import LhatConfig, lhat_traces
from probes.pipeline.updates import UpdatesConfig, updates_traces
from probes.run import main

TRACES = [
    ("What is 12 + 3?", "12 + 3 = 15.\nSo the answer is 15.", "15"),
    ("Compute 40 - 5 + 2.", "40 - 5 = 35.\nWait, 40 - 5 = 35.\n35 + 2 = 37.\nSo the answer is 37.", "37"),
    ("Evaluate 9 + 9.", "9 + 9 = 18.\nTherefore, the result is 18.", "18"),
    ("What is 30 - 4 - 3?", "30 - 4 = 26.\n26 - 3 = 23.\nThus the total is 23.", "23"),
    ("Compute 51 + 6.", "51 + 6 = 58.\nHold on, 51 + 6 is 57, not 58.\nSo the answer is 57.", "57"),
    ("What is 70 - 8?", "70 - 8 = 62.\nSo the answer is 62.", "62"),
]


def _tiny(seed: int, tokenizer):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return boot_model(AutoModelForCausalLM.from_config(tiny_config("qwen2")), tokenizer,
                      spec=f"tiny-qwen2-seed{seed}", device="cpu")


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmpmodels")
    traces = root / "t.jsonl"
    traces.write_text("".join(
        json.dumps({"id": f"q{i}", "question": q, "trajectory": f"<think>\n{t}\n</think>",
                    "answer": a}) + "\n"
        for i, (q, t, a) in enumerate(TRACES)))
    trained = load_model("tiny-reasoner", device="cpu")
    tok = byte_tokenizer()
    paths = {}
    for name, model, upd in (("trained", trained, True), ("rand", random_init_model(trained, 0), True),
                             ("tiny_a", _tiny(1, tok), False), ("tiny_b", _tiny(2, tok), False)):
        paths[name] = root / f"{name}.h5"
        lhat_traces(model, traces, paths[name], LhatConfig(), progress=False)
        if upd:
            updates_traces(model, traces, paths[name], UpdatesConfig(), resume=True, progress=False)
    paths["root"] = root
    return paths


def _json(capsys, *argv) -> dict:
    capsys.readouterr()
    assert main(["compare-models", *argv, "--json", "--n-boot", "200", "-q"]) == 0
    return json.loads(capsys.readouterr().out)


def _curves(path):
    with open_cache(path) as reader:
        return [np.asarray(tr["lhat"][:], np.float64) for tr in reader]


def test_trained_against_random_init(caches, capsys):
    rep = _json(capsys, str(caches["rand"]), str(caches["trained"]), "--plots", str(caches["root"]))
    rand, trained = rep["models"]
    assert trained == "tiny-reasoner" and "random-init" in rand
    assert rep["n_traces"] == 6 and rep["same_tokenizer_fingerprint"]
    assert rep["update_metrics"] == ["upd_sigma_gate", "upd_loo", "upd_contrib"]
    rows = rep["rows"]
    model_rows = {(r["model"], r["measure"], r["category"]): r for r in rows if r["kind"] == "model"}
    # the stability medians are those of the stored curves
    for name, key in ((trained, "trained"), (rand, "rand")):
        per = [stability_measures(y) for y in _curves(caches[key])]
        for m in STABILITY:
            assert model_rows[(name, m, "all")]["median"] == pytest.approx(np.median([p[m] for p in per]))
    for m in ("upd_sigma_gate", "upd_loo", "upd_contrib", "abs_dlhat"):
        for c in ("all", "reflection", "delimiter", "ordinary"):
            assert (trained, m, c) in model_rows
    # mean |ΔL̂| over all trajectory tokens, recomputed
    want = np.median([np.abs(np.diff(y)).mean() for y in _curves(caches["trained"])])
    assert model_rows[(trained, "abs_dlhat", "all")]["median"] == pytest.approx(want)
    paired = [r for r in rows if r["kind"] == "paired"]
    assert {(r["a"], r["b"]) for r in paired} == {(trained, rand)}
    fin = next(r for r in paired if r["measure"] == "final")
    # 6 traces are below the inference floor (analyses.inference.MIN_TRACES = 8): raw medians only
    assert fin["n"] == 6 and not fin["testable"] and fin["note"] == "n = 6: too few traces for inference"
    assert fin["ci_low"] is None and fin["p_holm"] is None and fin["median_diff"] is not None
    assert all(0 <= r["p_holm"] <= 1 for r in paired if r["p_holm"] is not None)
    assert rep["plots"][0].endswith("compare_models.png")
    import pandas as pd

    assert len(pd.DataFrame(rows)) == len(rows)


def test_two_tiny_models_sharing_a_tokenizer(caches, capsys):
    rep = _json(capsys, str(caches["tiny_a"]), str(caches["tiny_b"]), str(caches["tiny_a"]),
                "--names", "a", "b", "a_again", "--pairs", "all", "--window", "3")
    assert rep["update_metrics"] == [] and rep["window"] == 3
    paired = [r for r in rep["rows"] if r["kind"] == "paired"]
    assert {(r["a"], r["b"]) for r in paired} == {("b", "a"), ("a_again", "a"), ("a_again", "b")}
    # a model against itself: every difference is 0
    for r in paired:
        if (r["a"], r["b"]) == ("a_again", "a") and r["n"]:
            assert r["median_diff"] == 0.0  # (too few traces for a CI: the floor gives none)
            assert r["ci_low"] == r["ci_high"] == 0.0 if r["testable"] else r["ci_low"] is None
    curves = _curves(caches["tiny_a"])
    want = np.median([stability_measures(y, window=3)["osc_energy"] for y in curves])
    row = next(r for r in rep["rows"] if r["kind"] == "model" and r["model"] == "a"
               and r["measure"] == "osc_energy")
    assert row["median"] == pytest.approx(want)
    capsys.readouterr()
    assert main(["compare-models", str(caches["tiny_a"]), str(caches["tiny_b"]), "--n-boot", "100",
                 "-q"]) == 0
    text = capsys.readouterr().out
    assert "tiny-qwen2-seed2 - tiny-qwen2-seed1" in text and "osc_energy" in text


@pytest.mark.parametrize(("which", "extra", "needle"), [
    (("trained", "tiny_a"), [], "tokens differ"),
    (("trained",), [], "two or more"),
    (("tiny_a", "tiny_b"), ["--names", "x"], "--names"),
    (("tiny_a", "tiny_b"), ["--update-metrics", "upd_loo"], "lacks"),
    (("tiny_a", "tiny_b"), ["--update-metrics", "lhat"], "not update arrays"),
    (("tiny_a", "tiny_b"), ["--window", "0"], "--window"),
])
def test_refusals_are_one_error_line(caches, capsys, which, extra, needle):
    capsys.readouterr()
    assert main(["compare-models", *(str(caches[w]) for w in which), *extra, "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and needle in err[-1]

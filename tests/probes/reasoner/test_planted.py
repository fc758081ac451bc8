"""The planted-effect organism tiny-reasoner-planted: its task's ground truth, its shipped files, and
the L̂ comparison detecting its trained-in effect (and nothing on the random-init control)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from probes.models.load import _BUILTIN_REBUILD, BUILTIN_MODELS
from probes.reasoner import planted
from probes.reasoner import train as train_mod
from probes.traces.read import read_traces

N_TRACES = 50
ROW = ("reflection", "matched_to_reflection")


def test_ground_truth_is_in_every_record():
    problems = planted.generate_problems(300, seed=5)
    with_slip = [p for p in problems if p.slip_part is not None]
    assert 0.5 < len(with_slip) / len(problems) < 0.7
    for p in problems:
        parts = [int(v) for v in p.answer.split("-")]
        lines = p.trajectory.split("\n")
        stated = [int(x.rstrip(".").split(": ")[1].split("-")[-1]) for x in lines if x.startswith("So far: ")]
        if p.slip_part is None:
            assert stated == parts and p.reflection_span is None and p.n_mistakes == 0
            continue
        k = p.slip_part - 1
        assert stated == parts[:k] + [planted.slip(parts[k])] + parts[k + 1:]
        reflection = p.trajectory[slice(*p.reflection_span)]
        phrase = p.trajectory[slice(*p.phrase_span)]
        assert phrase in {w for w, _ in planted.CORRECTIONS} and reflection.startswith(phrase)
        right = "-".join(str(v) for v in parts[: k + 1])
        assert reflection.endswith(f"so far: {right}.")  # the reflection restates the code right
        assert reflection in lines
        assert lines[lines.index(reflection) - 1].endswith(f"{planted.slip(parts[k])}.")
    # the slip keeps a value uniform on 10..99: a permutation, never the identity
    assert sorted(planted.slip(v) for v in range(10, 100)) == list(range(10, 100))
    assert all(planted.slip(v) != v for v in range(10, 100))


def test_shipped_samples_are_the_generator_output_with_meta():
    shipped = planted.SAMPLES_PATH.read_text().splitlines()
    expected = [json.dumps(p.to_record(), ensure_ascii=False)
                for p in planted.generate_problems(train_mod.N_SAMPLES, seed=train_mod.SAMPLE_SEED)]
    assert shipped == expected
    traces = list(read_traces(planted.SAMPLES_PATH))
    assert traces[0].meta["source"] == "probes.reasoner.planted"
    assert {tuple(t.meta) >= ("slip_part",) for t in traces}
    assert sum(t.meta["slip_part"] is not None for t in traces) > 100


def test_checkpoint_is_registered_and_records_its_config():
    folder = BUILTIN_MODELS["tiny-reasoner-planted"]
    assert folder.name == "checkpoint_planted"
    assert _BUILTIN_REBUILD["tiny-reasoner-planted"] == "python -m probes.reasoner.train --task planted"
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 5 * 2**20
    record = json.loads((folder / "training_config.json").read_text())
    assert record == json.loads(json.dumps(train_mod.asdict(train_mod.PLANTED_CONFIG)))


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    """L̂ of the first N_TRACES shipped sample traces on tiny-reasoner-planted and on its random
    initialisation (seed 0), through the library runner."""
    from probes.models.controls import random_init_model
    from probes.models.load import load_model
    from probes.pipeline.lhat import LhatConfig, lhat_traces

    root = tmp_path_factory.mktemp("planted")
    traces = root / "traces.jsonl"
    traces.write_text("".join(planted.SAMPLES_PATH.read_text().splitlines(keepends=True)[:N_TRACES]))
    loaded = load_model("tiny-reasoner-planted", device="cpu")
    run, control = root / "run.h5", root / "random_init.h5"
    lhat_traces(loaded, traces, run, LhatConfig(), progress=False)
    lhat_traces(random_init_model(loaded, 0), traces, control, LhatConfig(), progress=False)
    return loaded, traces, run, control


def _row(cache):
    from probes.readouts.compare import compare_cache
    from probes.readouts.configs import CompareConfig

    report = compare_cache(cache, CompareConfig(n_boot=200, seed=0))
    (row,) = [r for r in report["table"]["rows"] if (r["a"], r["b"]) == ROW]
    return row


def test_l_hat_falls_at_each_correcting_reflection(planted_run):
    from probes.readouts.compare import load_curves
    from probes.traces.tokenize import tokenize_trace

    loaded, traces, run, _ = planted_run
    curves = {r["id"]: r["lhat"] for r in load_curves(run)[0]}
    drops = []
    for tr in read_traces(traces):
        toks = planted.phrase_tokens(tokenize_trace(tr, loaded.tokenizer))
        if toks:
            drops.append(curves[tr.id][toks[-1] + 1] - curves[tr.id][toks[0]])
    assert len(drops) >= 8
    # the designed effect: the reflection phrase lowers L̂, in (nearly) every trace that has one
    assert np.median(drops) < -0.1 and np.mean(np.array(drops) < 0) >= 0.9, drops


def test_compare_detects_the_planted_effect_and_not_on_the_control(planted_run):
    _, _, run, control = planted_run
    row = _row(run)
    null = _row(control)
    assert row["testable"] and row["n_traces"] >= 8
    assert row["median_diff"] > 0 and row["cliffs_delta"] > 0.5  # reflection > matched ordinary
    assert row["p_holm"] < 0.05
    assert null["testable"] and np.isfinite(null["p_holm"]) and not null["p_holm"] < 0.05
    assert null["cliffs_delta"] < 0.3  # the control must not show the trained direction
    # the random-init baseline: at most a token-identity effect, far below the trained one
    assert abs(null["median_diff"]) < 0.02 * row["median_diff"]

"""`updates` end to end on tiny-reasoner: stored shapes and values, resume, random-init control."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cache import open_cache
from probes.mlp_update import mlp_updates
from probes.models import load_model
from probes.reasoner.train import SAMPLES_PATH
from probes.run import main
from probes.traces import read_traces, tokenize_traces
from probes.updates import token_updates
from probes.updates_run import UPDATE_ARRAYS

BASE = ["--model", "tiny-reasoner", "--device", "cpu", "--json", "--no-progress"]


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """The first 6 sample traces."""
    path = tmp_path_factory.mktemp("traces") / "samples.jsonl"
    path.write_text("".join(SAMPLES_PATH.read_text().splitlines(keepends=True)[:6]))
    return path


@pytest.fixture(scope="module")
def trained(samples, tmp_path_factory):
    """A cache of the first 4 traces written by `updates` with the trained weights."""
    out = tmp_path_factory.mktemp("upd") / "run.h5"
    assert main(["updates", *BASE, "--traces", str(samples), "--out", str(out), "--limit", "4"]) == 0
    return out


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _read(path) -> dict[str, dict[str, np.ndarray]]:
    with open_cache(path) as reader:
        return {tr.id: {n: tr[n][:] for n in UPDATE_ARRAYS} for tr in reader}


def test_shapes_values_and_resume(samples, trained, capsys):
    model = load_model("tiny-reasoner", device="cpu")
    n_layers = model.arch.n_layers
    with open_cache(trained) as reader:
        assert len(reader) == 4
        tr = next(iter(reader))
        a, b = tr.spans["trajectory"]
        query = tr.spans["answer"][0] - 1
        assert int(tr.attrs["upd_query"]) == query
        stored = {n: tr[n][:] for n in UPDATE_ARRAYS}
        ids = torch.as_tensor(np.asarray(tr.tokens, dtype=np.int64)).reshape(1, -1)
        tid = tr.id
    for name, arr in stored.items():
        assert arr.dtype == np.float32 and arr.shape == (n_layers, b - a), name
    # the stored tokens are this tokenization of the traces file
    tts, _ = tokenize_traces(read_traces(samples).traces, model.tokenizer,
                             max_tokens=model.arch.n_ctx)
    assert np.array_equal(next(t for t in tts if t.trace.id == tid).ids, ids[0].numpy())
    upd = token_updates(model, ids, query)
    mlp = mlp_updates(model, ids, query, list(range(a, b)))
    direct = {
        "upd_contrib": upd.contrib_sum_norm[:, a:b],
        "upd_loo": upd.loo_sum_norm[:, a:b],
        "upd_mass": upd.mass[:, :, a:b].mean(axis=1),
        "upd_dai_fro": upd.dai_fro[:, :, a:b].sum(axis=1),
        "upd_sigma_gate": mlp.sigma_gate,
        "upd_sigma_up": mlp.sigma_up,
        "upd_cos_gate": mlp.cos_gate,
    }
    for name, ref in direct.items():
        np.testing.assert_allclose(stored[name], ref.astype(np.float32), rtol=0, atol=1e-6,
                                   equal_nan=True, err_msg=name)
    assert np.isnan(stored["upd_cos_gate"][:, 0]).all()
    assert np.all(stored["upd_mass"] >= 0) and np.all(stored["upd_mass"] <= 1)
    # resume: the 4 done traces are skipped, the 2 new ones written
    capsys.readouterr()
    assert main(["updates", *BASE, "--traces", str(samples), "--out", str(trained)]) == 0
    again = _last_json(capsys)
    assert (again["n_traces"], again["n_written"], again["n_skipped"]) == (6, 2, 4)
    assert set(again) >= {"n_traces", "n_written", "seconds", "out"}
    assert len(_read(trained)) == 6


def test_random_init_control_is_different_and_needs_its_own_file(samples, trained, tmp_path,
                                                                 capsys):
    ctrl = tmp_path / "ctrl.h5"
    assert main(["updates", *BASE, "--traces", str(samples), "--out", str(ctrl), "--limit", "2",
                 "--control", "random-init", "--seed", "3"]) == 0
    capsys.readouterr()
    with open_cache(ctrl) as reader:
        assert reader.metadata["model"] == "tiny-reasoner+random-init(3)"
    real, rand = _read(trained), _read(ctrl)
    tid = next(iter(rand))
    assert rand[tid]["upd_contrib"].shape == real[tid]["upd_contrib"].shape
    assert not np.allclose(rand[tid]["upd_contrib"], real[tid]["upd_contrib"])
    # appending the control to the trained-model cache: one-line error naming the model field
    before = _read(trained)
    assert main(["updates", *BASE, "--traces", str(samples), "--out", str(trained),
                 "--control", "random-init", "--seed", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model" in err[0] and "differ" in err[0] and "--out" in err[0]
    after = _read(trained)
    assert before.keys() == after.keys()
    for t in before:
        np.testing.assert_array_equal(before[t]["upd_contrib"], after[t]["upd_contrib"])


def test_lhat_cache_gains_updates(samples, tmp_path, capsys):
    out = tmp_path / "lhat.h5"
    assert main(["lhat", *BASE, "--traces", str(samples), "--out", str(out), "--limit", "3"]) == 0
    with open_cache(out) as reader:
        lhat = {tr.id: tr["lhat"][:] for tr in reader}
    capsys.readouterr()
    assert main(["updates", *BASE, "--traces", str(samples), "--out", str(out), "--limit", "3"]) == 0
    res = _last_json(capsys)
    assert (res["n_written"], res["n_skipped"]) == (3, 0)
    with open_cache(out) as reader:
        assert len(reader) == 3
        for tr in reader:
            np.testing.assert_array_equal(tr["lhat"][:], lhat[tr.id])
            a, b = tr.spans["trajectory"]
            assert tr["upd_loo"][:].shape[1] == b - a == tr["lhat"][:].shape[0] - 1

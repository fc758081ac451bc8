"""The notebook face: `import probes` stays light, and every door gives what the commands store."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import probes
from probes.errors import ProbesError


def test_import_probes_loads_no_torch():
    code = ("import sys, probes; probes.open_cache; probes.read_traces; "
            "print(sorted(m for m in ('torch', 'transformers', 'transformer_lens') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_public_names():
    assert set(dir(probes)) >= {"load_model", "read_traces", "lhat", "updates", "run_lhat",
                                "run_updates", "open_cache", "load_traces", "DATA_DIR"}
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        probes.nope  # noqa: B018


def test_read_traces_from_path_dicts_and_errors():
    from_file = probes.read_traces(probes.DATA_DIR / "tiny_reasoner_traces.jsonl")
    assert len(from_file) == 200
    first = from_file[0]
    record = {"id": first.id, "question": first.question, "trajectory": first.trajectory,
              "answer": first.answer}
    (again,) = probes.read_traces([record])
    assert (again.id, again.question, again.trajectory, again.answer) == \
        (first.id, first.question, first.trajectory, first.answer)
    assert probes.read_traces([{"problem": "p", "solution": "s", "answer": 3}])[0].answer == "3"
    with pytest.raises(ProbesError, match="record 1: missing"):
        probes.read_traces([{"question": "q"}], strict=True)
    with pytest.raises(ProbesError, match="no usable trace among 1 records"):
        probes.read_traces([{"question": "q"}])


@pytest.fixture(scope="module")
def model():
    return probes.load_model("tiny-reasoner", device="cpu")


def test_lhat_and_run_lhat_agree(model, tmp_path):
    traces = probes.read_traces(probes.DATA_DIR / "tiny_reasoner_traces.jsonl")[:2]
    one = probes.lhat(model, traces[1])
    T = one.trajectory[1] - one.trajectory[0]
    assert one.arrays["lhat"].shape == (T + 1,) and one.arrays["lhat_delta"].shape == (T,)
    np.testing.assert_allclose(one.arrays["lhat_delta"], np.diff(one.arrays["lhat"].astype(np.float64)),
                               atol=1e-6)
    stored = probes.run_lhat(model, traces, tmp_path / "run.h5")
    assert [s.id for s in stored] == [t.id for t in traces]
    np.testing.assert_array_equal(stored[1].arrays["lhat"], one.arrays["lhat"])
    table = one.to_pandas()
    refl = one.select("reflection")
    np.testing.assert_array_equal(table.lhat_delta.to_numpy()[refl], one.at("lhat_delta", refl))
    assert one.to_dict()["arrays"]["lhat"] == one.arrays["lhat"].tolist()
    with probes.open_cache(tmp_path / "run.h5") as store:
        tr = store.trace(traces[1].id)
        np.testing.assert_array_equal(tr.array("lhat_delta", at=tr.select("reflection")),
                                      one.at("lhat_delta", refl))

"""`updates` end to end: stored shapes and values (M1–M7) against direct calls, resume, the
random-init control, the tiny random-init families (Qwen2, Llama, Qwen3, Mistral, GPT-2, Phi-3,
OLMo-2, Gemma-3, Gemma-2), Phi-3's refused eager pass, Gemma-2's refused linear-memory pass, and the
clear refusal of a family it does not measure (GPT-NeoX)."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig

from cache import open_cache
from hooks.model import LoadedModel
from hooks.weights import LLAMA_FAMILIES
from probes.errors import ProbesError
from probes.measures.updates.alignment import answer_alignment
from probes.measures.updates.attention import UpdatesError, token_updates
from probes.measures.updates.families import EAGER_MISSING, SDPA_MISSING
from probes.measures.updates.mlp import mlp_updates
from probes.models.controls import random_init_model
from probes.models.load import boot_model, load_model
from probes.models.tiny import UPDATE_FAMILIES, byte_tokenizer, tiny_config
from probes.pipeline.updates import DONE_KEY, UPDATE_ARRAYS, UpdatesConfig, updates_traces
from probes.reasoner.train import SAMPLES_PATH
from probes.run import main
from probes.traces.read import read_traces
from probes.traces.tokenize import tokenize_traces

BASE = ["--model", "tiny-reasoner", "--device", "cpu", "--json", "--no-progress"]
NEW_ARRAYS = ("upd_align_cos", "upd_dl_pred", "upd_m7")


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
    assert main(["updates", "--resume", *BASE, "--traces", str(samples), "--out", str(out),
                 "--limit", "4"]) == 0
    return out


@pytest.fixture(scope="module")
def reasoner() -> LoadedModel:
    return load_model("tiny-reasoner", device="cpu")


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _read(path) -> dict[str, dict[str, np.ndarray]]:
    with open_cache(path) as reader:
        return {tr.id: {n: tr[n][:] for n in UPDATE_ARRAYS} for tr in reader}


def _capture_path(model: LoadedModel) -> str:
    """The M1–M4 capture of the direct calls: the bridge's (eager), or the linear-memory one for a
    family whose bridge does not fire the rotated q/k hooks (Phi-3)."""
    return "sdpa" if model.arch.family in EAGER_MISSING else "eager"


def _same_forward_rtol(model: LoadedModel) -> float:
    """Tolerance between M5 from the bridge capture and M6's step norms: 1e-12 where the gradient
    pass runs through the bridged model itself (the Llama layout: the same float32 forward), 1e-5
    where it runs on a plain-HF view (the other families: another float32 forward of the same
    weights)."""
    return 1e-12 if model.arch.family in LLAMA_FAMILIES else 1e-5


def _mlp_arrays(mlp) -> dict[str, np.ndarray]:
    """`upd_sigma_gate` / `upd_sigma_up` / `upd_cos_gate` from an `MlpUpdates`: a plain MLP's one
    input matrix W_in takes the gate slot, its up slot is NaN."""
    if mlp.sigma_gate is not None:
        return {"upd_sigma_gate": mlp.sigma_gate, "upd_sigma_up": mlp.sigma_up,
                "upd_cos_gate": mlp.cos_gate}
    return {"upd_sigma_gate": mlp.sigma_in, "upd_sigma_up": np.full_like(mlp.sigma_in, np.nan),
            "upd_cos_gate": mlp.cos_in}


def _direct(model: LoadedModel, tokens, spans) -> dict[str, np.ndarray]:
    """The stored quantities from separate `token_updates`, `mlp_updates`, `answer_alignment`
    calls (three forwards, the alignment one with its backward, M6 at every answer row)."""
    a, b = (int(x) for x in spans["trajectory"])
    answer = (int(spans["answer"][0]), int(spans["answer"][1]))
    query = answer[0] - 1
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64)).reshape(1, -1)
    path = _capture_path(model)
    upd = token_updates(model, ids, query, attention=path)
    mlp = _mlp_arrays(mlp_updates(model, ids, query, list(range(a, b))))
    al = answer_alignment(model, ids, (a, b), answer, attention=path)
    # σ is one quantity computed two ways: M5's Gram norm and M6's ‖step_i‖ at the first row
    rtol = _same_forward_rtol(model)
    np.testing.assert_allclose(al.step_norm[0][:, 0], mlp["upd_sigma_gate"], rtol=rtol)
    np.testing.assert_allclose(al.step_norm[1][:, 0], mlp["upd_sigma_up"], rtol=rtol)
    np.testing.assert_allclose(al.step_norm[2][:, 0], np.hypot(
        mlp["upd_sigma_gate"], np.nan_to_num(mlp["upd_sigma_up"])), rtol=rtol)
    return {
        "upd_contrib": upd.contrib_sum_norm[:, a:b],
        "upd_loo": upd.loo_sum_norm[:, a:b],
        "upd_mass": upd.mass[:, :, a:b].mean(axis=1),
        "upd_dai_fro": upd.dai_fro[:, :, a:b].sum(axis=1),
        **mlp,
        "upd_align_cos": al.cos[2][:, 0, :],
        "upd_dl_pred": al.inner[2][:, 0, :],
        "upd_m7": al.m7,
    }


def _assert_matches_direct(stored: dict[str, np.ndarray], direct: dict[str, np.ndarray]) -> None:
    assert set(stored) == set(direct) == set(UPDATE_ARRAYS)
    for name, ref in direct.items():
        ref = ref.astype(np.float32)
        scale = float(np.nanmax(np.abs(ref))) if np.isfinite(ref).any() else 1.0
        np.testing.assert_allclose(stored[name], ref, rtol=1e-6, atol=1e-6 * scale,
                                   equal_nan=True, err_msg=name)


def test_shapes_values_and_resume(samples, trained, reasoner, capsys):
    n_layers = reasoner.arch.n_layers
    tts, _ = tokenize_traces(read_traces(samples).traces, reasoner.tokenizer,
                             max_tokens=reasoner.arch.n_ctx)
    by_id = {t.trace.id: t for t in tts}
    with open_cache(trained) as reader:
        assert len(reader) == 4
        traces = [(tr.id, np.asarray(tr.tokens), dict(tr.spans), dict(tr.attrs),
                   {n: tr[n][:] for n in UPDATE_ARRAYS}) for tr in reader]
    for tid, tokens, spans, attrs, stored in traces:
        a, b = spans["trajectory"]
        assert int(attrs["upd_query"]) == spans["answer"][0] - 1
        assert attrs["upd_control"] == "none"
        for name, arr in stored.items():
            assert arr.dtype == np.float32 and arr.shape == (n_layers, b - a), name
        # the stored tokens are this tokenization of the traces file
        assert np.array_equal(by_id[tid].ids, tokens)
        _assert_matches_direct(stored, _direct(reasoner, tokens, spans))
        assert np.isnan(stored["upd_cos_gate"][:, 0]).all()
        assert np.all(stored["upd_mass"] >= 0) and np.all(stored["upd_mass"] <= 1)
        assert np.all(np.abs(stored["upd_align_cos"]) <= 1 + 1e-6)
        assert np.isfinite(stored["upd_m7"]).all() and np.abs(stored["upd_m7"]).max() > 0
    # resume: the 4 done traces are skipped, the 2 new ones written
    capsys.readouterr()
    assert main(["updates", "--resume", *BASE, "--traces", str(samples), "--out", str(trained)]) == 0
    again = _last_json(capsys)
    assert (again["n_traces"], again["n_written"], again["n_skipped"]) == (6, 2, 4)
    assert set(again) >= {"n_traces", "n_written", "seconds", "out"}
    assert len(_read(trained)) == 6


def test_cache_without_the_gradient_arrays_gains_them(samples, tmp_path, capsys):
    """A trace stored before M6/M7 existed (no `upd_m7`) is not done: resume recomputes it."""
    out = tmp_path / "old.h5"
    assert main(["updates", "--resume", *BASE, "--traces", str(samples), "--out", str(out),
                 "--limit", "2"]) == 0
    full = _read(out)
    with h5py.File(out, "r+") as fh:
        first = next(iter(fh["traces"].values()))
        for name in NEW_ARRAYS:
            del first[name]
    with open_cache(out) as reader:
        assert sum(DONE_KEY in tr.names() for tr in reader) == 1
    capsys.readouterr()
    assert main(["updates", "--resume", *BASE, "--traces", str(samples), "--out", str(out),
                 "--limit", "2"]) == 0
    res = _last_json(capsys)
    assert (res["n_written"], res["n_skipped"]) == (1, 1)
    again = _read(out)
    for tid in full:
        for name in UPDATE_ARRAYS:
            np.testing.assert_array_equal(again[tid][name], full[tid][name])


def test_random_init_control_is_different_and_needs_its_own_file(samples, trained, reasoner,
                                                                 tmp_path, capsys):
    ctrl = tmp_path / "ctrl.h5"
    assert main(["updates", "--resume", *BASE, "--traces", str(samples), "--out", str(ctrl), "--limit", "2",
                 "--control", "random-init", "--seed", "3"]) == 0
    capsys.readouterr()
    with open_cache(ctrl) as reader:
        assert reader.metadata["model"] == "tiny-reasoner+random-init(3)"
        stored = {tr.id: (np.asarray(tr.tokens), dict(tr.spans), dict(tr.attrs),
                          {n: tr[n][:] for n in UPDATE_ARRAYS}) for tr in reader}
    real, rand = _read(trained), _read(ctrl)
    tid = next(iter(rand))
    for name in UPDATE_ARRAYS:
        assert rand[tid][name].shape == real[tid][name].shape, name
        assert not np.allclose(rand[tid][name], real[tid][name], equal_nan=True), name
    # the control's arrays, M6/M7 included, are those of the same seeded random model
    random_model = random_init_model(reasoner, 3)
    for tokens, spans, attrs, arrays in stored.values():
        assert attrs["upd_control"] == "random-init"
        _assert_matches_direct(arrays, _direct(random_model, tokens, spans))
    # appending the control to the trained-model cache: one-line error naming the model field
    before = _read(trained)
    assert main(["updates", "--resume", *BASE, "--traces", str(samples), "--out", str(trained),
                 "--control", "random-init", "--seed", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model" in err[0] and "differ" in err[0] and "--out" in err[0]
    after = _read(trained)
    assert before.keys() == after.keys()
    for t in before:
        for name in UPDATE_ARRAYS:
            np.testing.assert_array_equal(before[t][name], after[t][name])


def test_lhat_cache_gains_updates(samples, tmp_path, capsys):
    out = tmp_path / "lhat.h5"
    assert main(["lhat", "--resume", *BASE, "--traces", str(samples), "--out", str(out), "--limit", "3"]) == 0
    with open_cache(out) as reader:
        lhat = {tr.id: tr["lhat"][:] for tr in reader}
    capsys.readouterr()
    assert main(["updates", "--resume", *BASE, "--traces", str(samples), "--out", str(out),
                 "--limit", "3"]) == 0
    res = _last_json(capsys)
    assert (res["n_written"], res["n_skipped"]) == (3, 0)
    with open_cache(out) as reader:
        assert len(reader) == 3
        for tr in reader:
            np.testing.assert_array_equal(tr["lhat"][:], lhat[tr.id])
            a, b = tr.spans["trajectory"]
            assert tr["upd_loo"][:].shape[1] == b - a == tr["lhat"][:].shape[0] - 1
            assert tr["upd_m7"][:].shape[1] == b - a


def _byte_traces(path, answers: tuple[str, str]):
    """Two short traces (byte tokenizer: one token per character) within tiny_config's 256."""
    rows = [
        {"id": "a", "question": "2+2?", "trajectory": "Add 2 and 2. Wait, 2+2=4. So 4.",
         "answer": answers[0]},
        {"id": "b", "question": "3*3?", "trajectory": "Three threes. Hmm, 9. Therefore 9.",
         "answer": answers[1]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def byte_traces(tmp_path_factory):
    """One-token answers."""
    return _byte_traces(tmp_path_factory.mktemp("byte") / "short.jsonl", ("4", "9"))


def _tiny(family: str) -> LoadedModel:
    """A seeded random-init model of `family` (non-zero biases where the config has them)."""
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation="eager")
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith(("proj.bias", "c_attn.bias", "c_fc.bias")):
                param.normal_(0.0, 0.2)
    return boot_model(hf, byte_tokenizer(), spec=f"tiny-{family}", device="cpu", dtype="float32")


@pytest.mark.parametrize("family", UPDATE_FAMILIES)
def test_tiny_random_init_families(family, byte_traces, tmp_path):
    """Qwen2 / Llama (o_proj bias) / Qwen3 (q/k norms) / Mistral / GPT-2 (plain MLP: NaN up slot)
    / Phi-3 (fused projections, the linear-memory pass) / OLMo-2 / Gemma-3 / Gemma-2 (norms after
    the sublayers, a sliding window; Gemma-2 on the eager pass): stored arrays equal the direct
    calls."""
    loaded = _tiny(family)
    out = tmp_path / "run.h5"
    res = updates_traces(loaded, byte_traces, out, UpdatesConfig(), resume=True, progress=False)
    assert (res.n_written, res.n_too_long) == (2, 0)
    with open_cache(out) as reader:
        for tr in reader:
            stored = {n: tr[n][:] for n in UPDATE_ARRAYS}
            _assert_matches_direct(stored, _direct(loaded, np.asarray(tr.tokens), tr.spans))


def _saved(family: str, folder) -> str:
    """A random-init model of `family` saved with the byte tokenizer (before any bridge wraps it)."""
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1,
                           num_attention_heads=4, intermediate_size=64,
                           max_position_embeddings=256) if family == "gpt_neox" else (
        tiny_config(family))
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return str(folder)


def test_unmeasured_family_is_refused_clearly_before_the_cache_is_touched(byte_traces, tmp_path,
                                                                          capsys):
    """GPT-NeoX (no weight view): one line naming the family and what is missing, no file."""
    folder = _saved("gpt_neox", tmp_path / "neox-model")
    out = tmp_path / "neox.h5"
    capsys.readouterr()
    with pytest.raises(UpdatesError, match=r"^updates does not measure 'gpt_neox' models yet: it "
                                           r"needs a weight view.*; supported: llama, .*gemma2.*\.$"):
        updates_traces(folder, byte_traces, out, UpdatesConfig(), resume=True, device="cpu",
                       progress=False)
    assert not out.exists()
    capsys.readouterr()
    # the CLI: exit 2 and one line on stderr
    assert main(["updates", "--resume", "--model", folder, "--device", "cpu", "--no-progress",
                 "--traces", str(byte_traces), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'gpt_neox'" in err[0] and "weight view" in err[0], err
    assert not out.exists()


def test_phi3_eager_pass_is_refused_and_the_cli_writes_its_arrays(byte_traces, tmp_path, capsys):
    """Phi-3 runs on the linear-memory pass: `--attention eager` is one line and no file; the
    default (auto) writes the same arrays as `--attention sdpa`."""
    folder = _saved("phi3", tmp_path / "phi3-model")
    out = tmp_path / "phi3.h5"
    capsys.readouterr()
    assert main(["updates", "--resume", "--model", folder, "--device", "cpu", "--no-progress",
                 "--traces", str(byte_traces), "--out", str(out), "--attention", "eager"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no eager pass for 'phi3'" in err[0] and "sdpa" in err[0], err
    assert not out.exists()
    stored = {}
    for attention in ("auto", "sdpa"):
        path = tmp_path / f"{attention}.h5"
        assert main(["updates", "--resume", "--model", folder, "--device", "cpu", "--no-progress",
                     "--traces", str(byte_traces), "--out", str(path), "--attention",
                     attention]) == 0
        stored[attention] = _read(path)
    assert stored["auto"].keys() == stored["sdpa"].keys() and len(stored["auto"]) == 2
    for tid, arrays in stored["sdpa"].items():
        for name in UPDATE_ARRAYS:
            np.testing.assert_array_equal(stored["auto"][tid][name], arrays[name])


# --answer-rows mean: every per-row quantity at each answer row of 𝒬, averaged over the rows


def _nanmean_rows(stack: np.ndarray) -> np.ndarray:
    """Mean over axis 0 skipping NaN; NaN where every row is NaN."""
    ok = ~np.isnan(stack)
    n = ok.sum(0)
    return np.where(n > 0, np.where(ok, stack, 0.0).sum(0) / np.maximum(n, 1), np.nan)


def _direct_mean(model: LoadedModel, tokens, spans) -> dict[str, np.ndarray]:
    """The `answer_rows="mean"` arrays from single-row library calls: `token_updates` and
    `mlp_updates` at each q ∈ 𝒬 (one forward each) and the row slices of one `answer_alignment`
    (M6 at every row), averaged over the rows."""
    a, b = (int(x) for x in spans["trajectory"])
    answer = (int(spans["answer"][0]), int(spans["answer"][1]))
    rows = list(range(answer[0] - 1, answer[1] - 1))
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64)).reshape(1, -1)
    path, rtol = _capture_path(model), max(_same_forward_rtol(model), 1e-9)
    upds = [token_updates(model, ids, q, attention=path) for q in rows]
    mlps = [mlp_updates(model, ids, q, list(range(a, b))) for q in rows]
    al = answer_alignment(model, ids, (a, b), answer, attention=path)
    assert al.cos.shape[2] == len(rows)
    for k, m in enumerate(mlps):  # M5 σ / cosine at each row = M6's step norm / step cosine
        for slot, which in enumerate(("gate", "up") if m.sigma_gate is not None else ("in",)):
            np.testing.assert_allclose(al.step_norm[slot][:, k], m.get(f"sigma_{which}"),
                                       rtol=rtol)
            np.testing.assert_allclose(al.step_cos[slot][:, k], m.get(f"cos_{which}"), rtol=rtol,
                                       atol=rtol * 0.1, equal_nan=True)     # cosines near 0
    mlps = [_mlp_arrays(m) for m in mlps]

    def mean(xs):
        return np.mean(np.stack(xs), axis=0)

    dai = [u.dai_fro[:, :, a:b].sum(axis=1) for u in upds]
    for d in dai[1:]:  # ‖v‖‖k̃‖ does not depend on the query row
        np.testing.assert_array_equal(d, dai[0])
    return {
        "upd_contrib": mean([u.contrib_sum_norm[:, a:b] for u in upds]),
        "upd_loo": mean([u.loo_sum_norm[:, a:b] for u in upds]),
        "upd_mass": mean([u.mass[:, :, a:b].mean(axis=1) for u in upds]),
        "upd_dai_fro": dai[0],
        "upd_sigma_gate": mean([m["upd_sigma_gate"] for m in mlps]),
        "upd_sigma_up": mean([m["upd_sigma_up"] for m in mlps]),
        "upd_cos_gate": _nanmean_rows(np.stack([m["upd_cos_gate"] for m in mlps])),
        "upd_align_cos": _nanmean_rows(np.stack([al.cos[2][:, k, :] for k in range(len(rows))])),
        "upd_dl_pred": mean([al.inner[2][:, k, :] for k in range(len(rows))]),
        "upd_m7": al.m7,
    }


@pytest.fixture(scope="module")
def mean_run(samples, tmp_path_factory, reasoner):
    """A cache of the first 3 sample traces written with `answer_rows="mean"`."""
    out = tmp_path_factory.mktemp("upd-mean") / "mean.h5"
    res = updates_traces(reasoner, samples, out, UpdatesConfig(limit=3, answer_rows="mean"),
                         resume=True, progress=False)
    assert res.n_written == 3
    return out


def test_answer_rows_mean_equals_row_average_of_direct_calls(samples, mean_run, trained,
                                                             reasoner):
    n_layers = reasoner.arch.n_layers
    first = _read(trained)
    with open_cache(mean_run) as reader:
        traces = [(tr.id, np.asarray(tr.tokens), dict(tr.spans), dict(tr.attrs),
                   {n: tr[n][:] for n in UPDATE_ARRAYS}) for tr in reader]
    assert len(traces) == 3
    for tid, tokens, spans, attrs, stored in traces:
        a, b = spans["trajectory"]
        n_rows = spans["answer"][1] - spans["answer"][0]
        assert n_rows >= 2  # the sample answers have several tokens: a real average
        assert attrs["upd_rows"] == "mean" and int(attrs["upd_n_rows"]) == n_rows
        assert int(attrs["upd_query"]) == spans["answer"][0] - 1
        for name, arr in stored.items():
            assert arr.dtype == np.float32 and arr.shape == (n_layers, b - a), name
        _assert_matches_direct(stored, _direct_mean(reasoner, tokens, spans))
        # rows-independent and rows-summed arrays equal the first-row run; the others differ
        for name in ("upd_dai_fro", "upd_m7"):
            np.testing.assert_allclose(stored[name], first[tid][name], rtol=1e-6, atol=1e-7,
                                       err_msg=name)
        for name in ("upd_contrib", "upd_loo", "upd_mass", "upd_sigma_gate", "upd_dl_pred"):
            assert not np.allclose(stored[name], first[tid][name]), name


def test_answer_rows_first_is_recorded(trained):
    with open_cache(trained) as reader:
        for tr in reader:
            assert tr.attrs["upd_rows"] == "first" and int(tr.attrs["upd_n_rows"]) == 1


def test_answer_rows_mismatch_is_refused_on_resume(samples, trained, mean_run, reasoner,
                                                   tmp_path):
    before_first, before_mean = _read(trained), _read(mean_run)
    # a "first" cache refuses a "mean" run, and the other way round: one error naming the flag
    for out, want, have in ((trained, "mean", "first"), (mean_run, "first", "mean")):
        with pytest.raises(ProbesError) as info:
            updates_traces(reasoner, samples, out, UpdatesConfig(answer_rows=want),
                           resume=True, progress=False)
        msg = str(info.value)
        assert "\n" not in msg and f"--answer-rows {have}" in msg and "--out" in msg, msg
        assert f"--answer-rows {want}" in msg, msg
    for path, before in ((trained, before_first), (mean_run, before_mean)):
        after = _read(path)
        assert after.keys() == before.keys()
        for t in before:
            for name in UPDATE_ARRAYS:
                np.testing.assert_array_equal(after[t][name], before[t][name])
    # a cache written before `upd_rows` existed counts as "first"
    old = tmp_path / "old.h5"
    assert updates_traces(reasoner, samples, old, UpdatesConfig(limit=1),
                          resume=True, progress=False).n_written == 1
    with h5py.File(old, "r+") as fh:
        for group in fh["traces"].values():
            for key in ("upd_rows", "upd_n_rows"):
                del group.attrs[key]
    with pytest.raises(ProbesError, match="--answer-rows first"):
        updates_traces(reasoner, samples, old, UpdatesConfig(limit=2, answer_rows="mean"),
                       resume=True, progress=False)
    res = updates_traces(reasoner, samples, old, UpdatesConfig(limit=2), resume=True, progress=False)
    assert (res.n_written, res.n_skipped) == (1, 1)


def test_answer_rows_must_be_known():
    with pytest.raises(ProbesError, match="--answer-rows"):
        UpdatesConfig(answer_rows="all")


@pytest.fixture(scope="module")
def byte_traces_long_answers(tmp_path_factory):
    """Short traces whose answers span several byte tokens (𝒬 has 3–5 rows)."""
    return _byte_traces(tmp_path_factory.mktemp("byte-long") / "short.jsonl", ("four", "x=9"))


@pytest.mark.parametrize("family", UPDATE_FAMILIES)
def test_answer_rows_mean_tiny_random_init_families(family, byte_traces_long_answers, tmp_path):
    """Every family `updates` measures: the "mean" arrays equal the row average of the
    single-row library calls."""
    loaded = _tiny(family)
    out = tmp_path / "run.h5"
    res = updates_traces(loaded, byte_traces_long_answers, out, UpdatesConfig(answer_rows="mean"),
                         resume=True, progress=False)
    assert (res.n_written, res.n_too_long) == (2, 0)
    with open_cache(out) as reader:
        for tr in reader:
            n_rows = tr.spans["answer"][1] - tr.spans["answer"][0]
            assert n_rows >= 3 and int(tr.attrs["upd_n_rows"]) == n_rows
            stored = {n: tr[n][:] for n in UPDATE_ARRAYS}
            _assert_matches_direct(stored, _direct_mean(loaded, np.asarray(tr.tokens), tr.spans))


def test_answer_rows_cli(samples, mean_run, tmp_path, capsys):
    out = tmp_path / "cli.h5"
    assert main(["updates", "--resume", *BASE, "--traces", str(samples), "--out", str(out), "--limit", "3",
                 "--answer-rows", "mean"]) == 0
    ref, got = _read(mean_run), _read(out)
    assert set(got) == set(ref)
    for t in ref:
        for n in UPDATE_ARRAYS:
            np.testing.assert_array_equal(got[t][n], ref[t][n])
    capsys.readouterr()
    assert main(["updates", "--resume", *BASE, "--traces", str(samples), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--answer-rows mean" in err[0] and "--out" in err[0]


@pytest.mark.parametrize("family", UPDATE_FAMILIES)
def test_linear_memory_pass_stores_what_the_eager_reference_stores(family, byte_traces, tmp_path):
    """`--attention sdpa` (the pass long traces take) writes the eager reference's arrays (Phi-3
    without an eager pass, Gemma-2 without a linear-memory one: the missing pass is refused in one
    line before the cache exists)."""
    loaded = _tiny(family)
    one_pass = {**{f: ("eager", "no eager pass") for f in EAGER_MISSING},
                **{f: ("sdpa", "no linear-memory pass") for f in SDPA_MISSING}}
    if loaded.arch.family in one_pass:                # the one pass it lacks: refused, no file
        attention, message = one_pass[loaded.arch.family]
        out = tmp_path / f"{attention}.h5"
        with pytest.raises(UpdatesError, match=rf"^updates: {message} for '{family}' models"):
            updates_traces(loaded, byte_traces, out, UpdatesConfig(attention=attention),
                           resume=True, progress=False)
        assert not out.exists()
        return
    stored = {}
    for attention in ("eager", "sdpa"):
        out = tmp_path / f"{attention}.h5"
        updates_traces(loaded, byte_traces, out, UpdatesConfig(attention=attention), resume=True,
                       progress=False)
        with open_cache(out) as reader:
            stored[attention] = {(tr.id, n): tr[n][:] for tr in reader for n in UPDATE_ARRAYS}
    assert stored["eager"].keys() == stored["sdpa"].keys()
    for key, ref in stored["eager"].items():
        np.testing.assert_allclose(stored["sdpa"][key], ref, rtol=1e-5, atol=1e-6, err_msg=str(key))


def test_attention_pass_must_be_known():
    with pytest.raises(ProbesError, match="--attention must be one of auto, sdpa, eager"):
        UpdatesConfig(attention="flash")

"""`generate` and `grade` end to end on tiny-reasoner: records the other commands read, lhat and
updates on the model's own samples, resume, kill -9, seeded reproducibility, summaries, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import probes.run
from cache import open_cache
from probes.demo.generation import format_generation_demo, generation_demo
from probes.models.load import load_model
from probes.reasoner.task import generate_problems, write_jsonl
from probes.traces.read import read_traces

ROOT = Path(__file__).resolve().parents[3]
RUN_CLI = "import sys, probes.run as r; sys.exit(r.main(sys.argv[1:]))"
"""`python -m probes.run` (for the subprocess test)."""


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-reasoner", device="cpu")


@pytest.fixture(scope="module")
def questions(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("questions") / "q.jsonl"
    write_jsonl(generate_problems(4, seed=31), path)
    return path


def _generate(questions: Path, out: Path, *extra: str) -> int:
    return probes.run.main(["generate", "--model", "tiny-reasoner", "--device", "cpu", "--questions",
                            str(questions), "--out", str(out), "--temperature", "0.8",
                            "--no-progress", *extra])


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow  # the demo's generation part: 24 samples, graded, L̂ on them, then updates
def test_own_samples_through_lhat_and_updates(tiny, tmp_path, capsys):
    """The demo's part (smaller: 6 fresh questions x 4 samples), graded, L̂ on them; then `updates`."""
    figures = generation_demo(tiny, tmp_path, n_questions=6)
    assert figures["n_samples"] == 24 and figures["lhat"]["n_traces"] == 24
    assert figures["accuracy"]["value"] > 0.6 and figures["pass_at_k"]["4"]["value"] >= figures[
        "pass_at_k"]["1"]["value"]
    assert figures["lhat"]["share_falling"] > 0.8
    assert figures["lhat"]["median_lhat_full_trajectory"] < figures["lhat"]["median_lhat_no_trajectory"]
    assert figures["tokens_per_s"] > 0
    assert "own samples: 6 fresh questions x 4 trajectories" in format_generation_demo(figures)
    samples = Path(figures["files"]["samples"])
    assert len(read_traces(samples, strict=True)) == 24
    out = tmp_path / "updates.h5"
    assert probes.run.main(["updates", "--model", "tiny-reasoner", "--device", "cpu", "--traces",
                            str(samples), "--out", str(out), "--limit", "2", "--no-progress"]) == 0
    with open_cache(out) as reader:
        assert len(reader) == 2 and all("upd_m7" in tr for tr in reader)
    capsys.readouterr()


def test_records_and_json(questions, tmp_path, capsys):
    out = tmp_path / "samples.jsonl"
    assert _generate(questions, out, "--n", "2", "--limit", "3", "--json") == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (report["n_written"], report["n_skipped"], report["n_inputs"]) == (6, 0, 3)
    assert report["tokens_per_s"] > 0 and report["statistics"]["n_questions"] == 3
    records = _lines(out)
    first = records[0]
    assert [r["id"] for r in records[:2]] == [f"{first['group']}-s0", f"{first['group']}-s1"]
    assert {"id", "group", "sample", "variant", "question", "trajectory", "response", "model_answer",
            "answer", "correct", "finish_reason", "n_tokens", "prompt", "model", "backend", "dtype",
            "temperature", "top_p", "max_new_tokens", "seed", "thinking", "grade_method",
            "sample_seed", "device"} <= set(first)
    assert first["model"] == "tiny-reasoner" and first["backend"] == "hf" and first["temperature"] == 0.8
    assert first["trajectory"].startswith("<think>") and first["trajectory"].endswith("</think>")
    assert first["finish_reason"] == "stop" and isinstance(first["correct"], bool)
    # the traces read as they are, and `grade` agrees with the grades written
    assert len(read_traces(out, strict=True)) == 6
    assert probes.run.main(["grade", str(out), "--json"]) == 0
    graded = json.loads(capsys.readouterr().out)
    assert graded["n_agree_recorded"] == graded["n_recorded"] == 6
    assert graded["n_correct"] == sum(r["correct"] for r in records)


def test_resume_equals_an_uninterrupted_run(questions, tmp_path, capsys):
    """Seeded runs reproduce; a resumed run (interrupted line, --n grown) gives the same file."""
    whole, again, resumed = tmp_path / "whole.jsonl", tmp_path / "again.jsonl", tmp_path / "resumed.jsonl"
    assert _generate(questions, whole, "--n", "3") == 0
    assert _generate(questions, again, "--n", "3", "--batch-size", "5") == 0
    assert again.read_bytes() == whole.read_bytes()
    assert _generate(questions, resumed, "--n", "2", "--limit", "2") == 0
    with resumed.open("ab") as fh:                    # a write cut short by a kill
        fh.write(whole.read_bytes().splitlines(keepends=True)[5][:50])
    capsys.readouterr()
    assert _generate(questions, resumed, "--n", "3", "--resume", "--json") == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out.strip().splitlines()[-1])
    assert report["n_skipped"] == 4 and report["n_written"] == 8 and report["dropped_bytes"] == 50
    assert "dropped an interrupted last line (50 bytes)" in captured.err
    ids = [r["id"] for r in _lines(resumed)]
    assert len(ids) == len(set(ids)) == 12
    assert sorted(_lines(resumed), key=lambda r: r["id"]) == sorted(_lines(whole), key=lambda r: r["id"])
    # resuming with other settings is refused in one line, nothing written
    before = resumed.read_bytes()
    assert _generate(questions, resumed, "--n", "3", "--resume", "--seed", "1") == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "has seed=0, this run 1" in err and err.count("\n") == 1
    assert resumed.read_bytes() == before


@pytest.mark.slow
def test_kill_9_loses_at_most_the_line_being_written(questions, tmp_path, capsys):
    out, reference = tmp_path / "killed.jsonl", tmp_path / "reference.jsonl"
    args = ["generate", "--model", "tiny-reasoner", "--device", "cpu", "--questions", str(questions),
            "--temperature", "0.8", "--no-progress", "--n", "3", "--limit", "2", "--batch-size", "1"]
    proc = subprocess.Popen([sys.executable, "-c", RUN_CLI, *args, "--out", str(out)], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    killed = out.read_bytes()
    complete = killed[: killed.rfind(b"\n") + 1]
    assert 2 <= complete.count(b"\n") < 6
    assert probes.run.main([*args, "--out", str(out), "--resume"]) == 0
    assert probes.run.main([*args, "--out", str(reference), "--batch-size", "8"]) == 0
    final = out.read_bytes()
    assert final.startswith(complete)                  # nothing written before the kill is lost
    assert final == reference.read_bytes()             # and the finished file is the whole run
    capsys.readouterr()


def test_summaries_pair_with_their_sources(questions, tmp_path, capsys):
    samples, summaries = tmp_path / "samples.jsonl", tmp_path / "summaries.jsonl"
    assert _generate(questions, samples, "--n", "2", "--limit", "1") == 0
    base = ["generate", "--model", "tiny-reasoner", "--device", "cpu", "--summarize", str(samples),
            "--out", str(summaries), "--max-new-tokens", "60", "--no-progress"]
    assert probes.run.main(base) == 0
    sources = {r["id"]: r for r in _lines(samples)}
    rows = _lines(summaries)
    assert len(rows) == 2
    for row in rows:
        source = sources[row["source_id"]]
        assert row["variant"] == "summary" and row["id"] == f"{source['id']}-summary"
        assert (row["group"], row["sample"], row["answer"]) == (source["group"], source["sample"],
                                                                source["answer"])
        assert row["trajectory"].startswith("<think>\n") and row["trajectory"].endswith("\n</think>")
        reasoning = source["trajectory"].removeprefix("<think>\n").removesuffix("</think>").strip()
        assert reasoning in row["prompt"]
        assert "boxed" not in row["prompt"]                 # the answer part is left out
    assert len(read_traces(summaries, strict=True)) == 2
    capsys.readouterr()
    assert probes.run.main([*base, "--resume", "--n", "2"]) == 2
    assert probes.run.main([*base, "--resume", "--summary-prompt", "no field"]) == 2
    err = capsys.readouterr().err
    assert "drop --n" in err and "has no '{trajectory}' field" in err


def test_one_line_errors(questions, tmp_path, capsys, monkeypatch):
    from probes.models import generate as backends

    out = tmp_path / "out.jsonl"
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: None)
    assert _generate(questions, out, "--backend", "vllm") == 2
    assert _generate(questions, out, "--max-new-tokens", "5000") == 2
    out.write_text("")
    assert _generate(questions, out) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("error:") for line in err)
    assert "needs vLLM" in err[0] and "use --max-new-tokens" in err[1] and "pass --resume" in err[2]


def test_grade_real_traces(real_traces_path, tmp_path, capsys):
    out = tmp_path / "graded.jsonl"
    assert probes.run.main(["grade", str(real_traces_path), "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_records"] == 487 and report["n_recorded"] == report["n_agree_recorded"] == 332
    assert 0.6 < report["accuracy"] < 0.75 and report["n_no_answer"] == 122
    graded = _lines(out)
    assert len(graded) == 487 and all({"model_answer", "correct"} <= set(r) for r in graded)
    source_ids = [json.loads(line)["id"] for line in real_traces_path.read_text().splitlines()]
    assert [r["id"] for r in graded] == source_ids
    assert probes.run.main(["grade", str(real_traces_path), "--out", str(out)]) == 2
    assert "already exists; choose another --out" in capsys.readouterr().err


def test_vllm_backend_through_a_stand_in(questions, tmp_path, monkeypatch):
    """The vLLM adapter against a stand-in `vllm` module (vLLM itself needs a GPU machine): the
    requests it builds and the records written from its outputs."""
    import importlib.machinery
    import types
    from types import SimpleNamespace

    from probes.models.generate import sample_seed
    from probes.models.load import load_tokenizer
    from probes.pipeline.generate.sampling import generate_samples
    from probes.pipeline.generate.settings import GenerateConfig

    tok = load_tokenizer("tiny-reasoner")
    reply = tok("<think>\n1 + 1 = 2.\n</think>\n\n**Final Answer**\n\\boxed{2}", add_special_tokens=False)
    calls = []

    class LLM:
        def __init__(self, *, model, tokenizer, dtype, seed):
            calls.append({"model": model, "dtype": dtype, "seed": seed})

        def generate(self, prompts, params, use_tqdm):
            calls.append({"prompts": prompts, "params": params})
            ids = [*reply["input_ids"], tok.eos_token_id]
            return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids, finish_reason="stop")])
                    for _ in prompts]

    fake = types.ModuleType("vllm")
    fake.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    fake.LLM, fake.SamplingParams = LLM, lambda **kw: SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    out = tmp_path / "vllm.jsonl"
    result = generate_samples("tiny-reasoner", questions, out, GenerateConfig(n=2, limit=2, batch_size=64),
                              backend="vllm", dtype="bfloat16", progress=False)
    assert result.n_written == 4 and result.backend == "vllm"
    assert calls[0]["dtype"] == "bfloat16" and calls[0]["model"].endswith("checkpoint")
    records, params = _lines(out), calls[1]["params"]
    assert [p.seed for p in params] == [sample_seed(0, r["id"]) for r in records]
    first = records[0]
    assert {(p.temperature, p.top_p, p.max_tokens) for p in params} == {(0.6, 0.95, first["max_new_tokens"])}
    prompt = tok(first["prompt"], add_special_tokens=False)["input_ids"]
    assert calls[1]["prompts"][0]["prompt_token_ids"] == prompt
    assert (first["backend"], first["dtype"], first["device"], first["model"]) == (
        "vllm", "bfloat16", "cuda", "tiny-reasoner")
    assert first["trajectory"] == "<think>\n1 + 1 = 2.\n</think>" and first["model_answer"] == "2"
    assert first["finish_reason"] == "stop" and first["n_tokens"] == len(reply["input_ids"]) + 1

"""`study` end to end: every stage into its own store, the manifest, the comparisons and the report;
a rerun skips what is done; a family a stage does not measure skips that stage with the runner's
reason; bad input is one `error:` line before any work; a run killed with SIGKILL and run again
equals one uninterrupted run (bit-exact stores)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoModelForCausalLM, GPTNeoXConfig

from cache import open_cache
from probes import DATA_DIR
from probes.models.tiny import byte_tokenizer
from probes.pipeline.study import MANIFEST, STAGES, STORES
from probes.run import main

ROOT = Path(__file__).resolve().parents[3]
TRACES = DATA_DIR / "tiny_reasoner_traces.jsonl"
BASE = ["study", "--model", "tiny-reasoner", "--device", "cpu", "--no-progress", "--traces",
        str(TRACES)]


def _arrays(path: Path) -> dict[str, dict[str, tuple[str, tuple[int, ...], bytes]]]:
    """Every array of every trace of a store: (dtype, shape, raw bytes), by trace id and name."""
    out: dict = {}
    with open_cache(path) as reader:
        for tr in reader:
            out[tr.id] = {}
            for name in tr.names():
                value = np.asarray(tr[name][()])
                out[tr.id][name] = (value.dtype.str, value.shape, value.tobytes())
    return out


def _stage_status(folder: Path, stage: str) -> str | None:
    """A stage's status in the manifest as it stands (None: not there yet, or being rewritten)."""
    try:
        return json.loads((folder / "study.json").read_text())["stages"][stage]["status"]
    except (OSError, ValueError, KeyError):
        return None


def _manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """A study of 3 traces with every analysis but resampling and the random-init control."""
    folder = tmp_path_factory.mktemp("study") / "s"
    assert main([*BASE, "--limit", "3", "--out", str(folder), "--control", "random-init",
                 "--pairs-per-category", "2", "--analyses",
                 "activations,lhat,updates,receiver,suppression,effects"]) == 0
    return folder


def test_every_stage_runs_into_its_store_then_compare_and_report(full, tmp_path):
    m = _manifest(full)
    assert list(m["stages"]) == [*STAGES, "compare", "report"]
    assert {k: v["status"] for k, v in m["stages"].items()} == dict.fromkeys(m["stages"], "done")
    assert m["settings"]["analyses"] == ["activations", "lhat", "updates", "receiver",
                                         "suppression", "effects"]
    for stage in STAGES:
        assert m["stages"][stage]["store"] == STORES[stage]
        assert m["stages"][stage]["n_written"] == 3, stage
        assert len(_arrays(full / STORES[stage])) == 3, stage
    assert m["stages"]["compare"]["files"] == ["compare.json", "compare-control.json",
                                               "effects.h5.effects.json"]
    assert m["stages"]["report"]["files"] == ["report.html"]
    assert (full / "report.html").read_text().lstrip().lower().startswith("<!doctype html")
    # the updates comparison ran with the random-init control beside it
    upd = json.loads((full / "compare.json").read_text())["updates"]["comparison"]["rows"]
    assert any(r["control_effect"] is not None for r in upd)
    # the report is of the whole folder: L̂, updates and the analyses of the other stores
    page = (full / "report.html").read_text()
    for section in ("lhat", "updates", "fit", "anchors", "effects"):
        assert re.search(rf'<section id="{section}"[^>]*data-computed="true"', page), section
    # the run store equals what its own commands write: lhat, then updates --resume into it
    alone = tmp_path / "run.h5"
    common = ["--model", "tiny-reasoner", "--device", "cpu", "--no-progress",
              "--traces", str(TRACES), "--limit", "3", "--out", str(alone)]
    assert main(["lhat", *common]) == 0
    assert main(["updates", *common, "--resume"]) == 0
    assert _arrays(alone) == _arrays(full / "run.h5")


def test_a_rerun_skips_every_stage_done_and_says_so(full, capsys):
    before = {s: _arrays(full / STORES[s]) for s in ("lhat", "updates-control")}
    capsys.readouterr()
    assert main([*BASE, "--limit", "3", "--out", str(full), "--control", "random-init",
                 "--pairs-per-category", "2", "--analyses",
                 "activations,lhat,updates,receiver,suppression,effects"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum("done (already done)" in line for line in lines) == len(STAGES) + 2, lines
    assert {s: _arrays(full / STORES[s]) for s in before} == before


def test_other_settings_on_a_study_folder_are_one_error(full, capsys):
    capsys.readouterr()
    assert main([*BASE, "--limit", "2", "--out", str(full), "--control", "random-init"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "other settings" in err[0], err
    assert "limit: stored 3, given 2" in err[0] and "--out" in err[0], err


def test_default_analyses_leave_out_activations_and_the_control(tmp_path):
    """Stages not asked for are listed as skipped with the flag that runs them (no store)."""
    folder = tmp_path / "s"
    assert main([*BASE, "--limit", "2", "--out", str(folder), "--analyses", "lhat"]) == 0
    stages = _manifest(folder)["stages"]
    assert stages["lhat"]["status"] == "done"
    assert stages["activations"] == {"status": "skipped",
                                     "reason": "not asked (--analyses activations runs it)"}
    assert stages["anchors"]["reason"] == "not asked (--analyses receiver,suppression,resampling runs it)"
    assert stages["updates-control"]["reason"] == "not asked (--control random-init runs it)"
    assert stages["report"]["status"] == "done" and (folder / "report.html").is_file()
    assert sorted(p.name for p in folder.glob("*.h5")) == ["run.h5"]


def _neox(folder: Path) -> str:
    """A random-init GPT-NeoX (a family `updates` and `effects` do not measure) saved with the
    byte tokenizer."""
    import torch

    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1,
                           num_attention_heads=4, intermediate_size=64,
                           max_position_embeddings=256)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return str(folder)


def test_a_family_a_stage_does_not_measure_skips_that_stage_with_the_reason(tmp_path, capsys):
    traces = tmp_path / "t.jsonl"
    traces.write_text(json.dumps({"id": "a", "question": "2+2?", "answer": "4",
                                  "trajectory": "Add 2 and 2. Wait, 2+2=4. So 4."}) + "\n")
    model = _neox(tmp_path / "neox")
    folder = tmp_path / "s"
    capsys.readouterr()
    assert main(["study", "--model", model, "--device", "cpu", "--no-progress", "--traces",
                 str(traces), "--out", str(folder), "--analyses", "lhat,updates,effects"]) == 0
    out = capsys.readouterr().out
    stages = _manifest(folder)["stages"]
    assert stages["lhat"]["status"] == "done"
    for stage in ("updates", "effects"):
        assert stages[stage]["status"] == "skipped", stage
        assert "'gpt_neox'" in stages[stage]["reason"], stages[stage]
        assert f"{stage}: skipped: {stages[stage]['reason']}" in out
    assert stages["updates"]["reason"].startswith("updates does not measure 'gpt_neox' models yet")
    assert not (folder / STORES["effects"]).exists()  # refused before its store was made
    stored = {name for arrays in _arrays(folder / STORES["updates"]).values() for name in arrays}
    assert "lhat" in stored and not any(n.startswith("upd_") for n in stored)  # run.h5: L̂ only


@pytest.mark.parametrize("args, needle", [
    (["--analyses", "lhat,bogus"], "choose from activations, lhat, updates"),
    (["--model", "no-such-model-xyz"], "no-such-model-xyz"),
    (["--traces", "/nonexistent/t.jsonl"], "/nonexistent/t.jsonl does not exist"),
])
def test_bad_input_is_one_error_line_before_any_work(args, needle, tmp_path, capsys):
    folder = tmp_path / "s"
    argv = [*BASE, "--out", str(folder), "--limit", "2"]
    for flag, value in zip(args[::2], args[1::2]):
        i = argv.index(flag) if flag in argv else None
        if i is None:
            argv += [flag, value]
        else:
            argv[i + 1] = value
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(("error: ", "trajectory-probes study: error:")), err
    assert needle in err[0], err
    assert not folder.exists()


def test_an_out_that_is_a_file_or_under_a_file_is_one_error_line(tmp_path, capsys):
    afile = tmp_path / "f"
    afile.write_text("x")
    capsys.readouterr()
    assert main([*BASE, "--out", str(afile)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --out {afile} is a file; the study writes a folder: choose another "
                   f"--out"]
    assert main([*BASE, "--out", str(afile / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{afile} is a file, so the folder cannot be created" in err[0], err
    assert afile.read_text() == "x"


def test_an_unwritable_out_is_one_error_line(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write any folder (root)")
        capsys.readouterr()
        assert main([*BASE, "--out", str(locked / "s")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "not writable" in err[0], err
    finally:
        locked.chmod(0o700)


@pytest.mark.slow
def test_a_study_killed_mid_stage_and_run_again_equals_one_uninterrupted_run(tmp_path):
    args = [sys.executable, "-m", "probes.run", *BASE, "--limit", "3", "--analyses",
            "lhat,updates", "--control", "random-init"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    whole = tmp_path / "whole"
    subprocess.run([*args, "--out", str(whole)], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*args, "--out", str(killed)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None and _stage_status(killed, "lhat") != "done":
            time.sleep(0.05)  # killed in the updates stage, which adds to run.h5
        assert proc.poll() is None, "the study ended before the kill"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _manifest(killed)["stages"]["lhat"]["status"] == "done"
    assert "updates" not in _manifest(killed)["stages"]
    done = subprocess.run([*args, "--out", str(killed)], cwd=ROOT, env=env, check=True,
                          capture_output=True, text=True)
    assert "[2/10] lhat: done (already done)" in done.stdout, done.stdout
    for store in ("run.h5", "random_init.h5", "lhat-control.h5"):
        assert _arrays(killed / store) == _arrays(whole / store), store
    assert (killed / "report.html").is_file()
    assert _manifest(killed)["settings"] == _manifest(whole)["settings"]


def test_a_comparison_that_refuses_its_stores_is_listed_and_the_study_ends(tmp_path, capsys):
    """One trace: `compare --control` needs two shared traces, so it (and the report, which holds
    that comparison) is refused with its one line; the study still exits 0 with its stores."""
    folder = tmp_path / "s"
    capsys.readouterr()
    assert main([*BASE, "--limit", "1", "--out", str(folder), "--analyses", "updates",
                 "--control", "random-init"]) == 0
    stages = _manifest(folder)["stages"]
    assert stages["updates"]["status"] == stages["updates-control"]["status"] == "done"
    reason = ("compare.json: --control {c} shares 1 traces with {u}; run `updates "
              "--control random-init` on the same traces file").format(
        c=folder / "random_init.h5", u=folder / "run.h5")
    assert stages["compare"] == {"status": "skipped", "reason": reason}
    assert stages["report"]["status"] == "skipped"
    assert stages["report"]["reason"] == reason.split(": ", 1)[1]
    assert not (folder / "report.html").exists()
    assert f"compare: skipped: {reason}" in capsys.readouterr().out

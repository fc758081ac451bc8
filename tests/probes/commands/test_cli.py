"""The command line: demo summary, categories counts, help texts and one-line user errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from probes.run import main


@pytest.mark.slow
def test_demo_json_summary(capsys, tmp_path):
    assert main(["demo", "--limit", "30", "--device", "cpu", "--json", "--out", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_traces"] == 30
    assert 0.9 <= summary["answer_accuracy"] <= 1.0
    assert summary["answer_accuracy_no_trajectory"] < 0.3
    assert summary["mean_answer_nll"] * 5 <= summary["mean_answer_nll_no_trajectory"]
    cats = summary["tokens_per_category"]
    assert set(cats) == {"ordinary", "reflection", "delimiter", "prompt", "scaffold", "answer"}
    assert min(cats.values()) > 0
    assert summary["n_traces_with_reflection"] >= 6  # at least 20% of the traces
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["cache"]["n_traces"] == 30 and (tmp_path / "run.h5").is_file()
    lh = summary["lhat"]
    assert lh["n_traces"] == 30 and lh["naive_max_abs_diff"] <= 1e-4
    assert lh["share_falling"] >= 0.9  # the answer becomes certain along the trajectory
    rv = summary["reflection_vs_ordinary"]
    lo, hi = rv["median_diff_ci"]
    assert lo <= rv["median_diff"] <= hi
    assert rv["reflections_move_lhat"] in ("more", "less", "not distinguishably more or less")
    assert rv["n_traces"] >= 8
    assert all(p.endswith(".png") and (tmp_path / "plots").is_dir() for p in summary["plots"])


@pytest.mark.slow
def test_demo_table(capsys):
    assert main(["demo", "--limit", "5", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "greedy answer accuracy" in out and "tokens per category" in out
    assert "falls beyond its noise floor" in out and "reflections vs matched ordinary tokens" in out
    # five traces: below the floor on inference, so no interval and no p-value
    assert "n = 5: too few traces for inference" in out and "Wilcoxon p" not in out


def test_categories_json_on_the_samples(capsys):
    from probes.reasoner.train import SAMPLES_PATH

    args = ["categories", "--traces", str(SAMPLES_PATH), "--tokenizer", "tiny-reasoner", "--json"]
    assert main(args) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["n_traces"] == 200 and counts["n_bad_lines"] == 0
    assert counts["phrases"]["</think>"] == 200
    text = SAMPLES_PATH.read_text()
    assert counts["phrases"]["wait"] == text.count("Wait")


def test_categories_reports_bad_lines_and_strict_fails(capsys, tmp_path):
    from probes.reasoner.train import SAMPLES_PATH

    bad = tmp_path / "bad.jsonl"
    good = SAMPLES_PATH.read_text().splitlines()[:3]
    bad.write_text("\n".join([good[0], "{not json", good[1], '{"question": "q"}', good[2]]) + "\n")
    assert main(["categories", "--traces", str(bad), "--tokenizer", "tiny-reasoner", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["n_traces"] == 3
    assert "line 2" in captured.err and "line 4" in captured.err
    code = main(["categories", "--traces", str(bad), "--tokenizer", "tiny-reasoner", "--strict"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{bad}:2" in err[0]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["categories", "--traces", "/nonexistent/t.jsonl", "--tokenizer", "tiny-reasoner"], "t.jsonl"),
        (["categories", "--traces", "{samples}", "--tokenizer", "/no/such/model"], "/no/such/model"),
        (["demo", "--device", "tpu"], "tpu"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(argv, needle, capsys):
    from probes.reasoner.train import SAMPLES_PATH

    argv = [a.replace("{samples}", str(SAMPLES_PATH)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]


@pytest.mark.slow
def test_module_entry_point_help():
    for sub in ([], ["demo"], ["categories"]):
        out = subprocess.run(
            [sys.executable, "-m", "probes.run", *sub, "--help"], capture_output=True, text=True
        )
        assert out.returncode == 0
        assert "usage: python -m probes.run" in out.stdout
    top = subprocess.run([sys.executable, "-m", "probes.run", "--help"], capture_output=True, text=True)
    assert "demo" in top.stdout and "categories" in top.stdout

"""The wheel a user installs: it holds the shipped checkpoint and data, builds without setuptools
warnings, and the toolkit runs from it outside the repository."""

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds the wheel and runs the demo from it in a subprocess

ROOT = Path(__file__).resolve().parents[2]

SHIPPED = (
    "probes/reasoner/checkpoint/model.safetensors",
    "probes/reasoner/checkpoint/config.json",
    "probes/reasoner/checkpoint/tokenizer.json",
    "probes/reasoner/checkpoint/tokenizer_config.json",
    "probes/reasoner/checkpoint/chat_template.jinja",
    "probes/data/lexicon.json",
    "probes/reasoner/checkpoint_sft_early/model.safetensors",
    "probes/reasoner/checkpoint_sft_early/config.json",
    "probes/reasoner/checkpoint_grpo/model.safetensors",
    "probes/reasoner/checkpoint_grpo/config.json",
    "probes/data/tiny_reasoner_traces.jsonl",
    "probes/data/tiny_reasoner_variants.jsonl",
    "cache/SCHEMA.md",
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[Path, str]:
    """Build the wheel once (no build isolation: the test environment has setuptools)."""
    pytest.importorskip("setuptools")
    out = tmp_path_factory.mktemp("wheel")
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
         "-w", str(out), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    (path,) = out.glob("trajectory_probes-*.whl")
    return path, res.stdout + res.stderr


def test_wheel_holds_the_checkpoint_and_data(wheel):
    path, _ = wheel
    names = set(zipfile.ZipFile(path).namelist())
    for item in SHIPPED:
        assert item in names, item
    for package in ("probes", "probes/traces", "probes/models", "probes/measures",
                    "probes/commands", "probes/reasoner", "hooks", "cache", "analyses"):
        assert f"{package}/__init__.py" in names, package
    assert not any(n.startswith(("tests/", "bench/", "docs/")) for n in names)


def test_build_prints_no_setuptools_warnings(wheel):
    _, log = wheel
    warnings = [line for line in log.splitlines()
                if re.search(r"\w+Warning\b|absent from the `packages`", line)]
    assert warnings == []


@pytest.fixture(scope="module")
def site(wheel, tmp_path_factory) -> Path:
    """The wheel installed (unpacked) into a folder of its own, outside the repository."""
    path, _ = wheel
    site = tmp_path_factory.mktemp("site")
    zipfile.ZipFile(path).extractall(site)
    return site


def _env(site: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(site), "TOKENIZERS_PARALLELISM": "false"}


def test_demo_runs_from_the_wheel_outside_the_repository(site, tmp_path):
    env = _env(site)
    where = subprocess.run([sys.executable, "-c", "import probes, hooks; print(probes.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, check=True)
    assert Path(where.stdout.strip()).is_relative_to(site)  # the wheel's copy, not the repo's
    res = subprocess.run(
        [sys.executable, "-m", "probes.run", "demo", "--limit", "3", "--device", "cpu", "--out",
         str(tmp_path / "demo")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "3 traces of tiny-reasoner" in res.stdout
    assert (tmp_path / "demo" / "run.h5").is_file()
    assert (tmp_path / "demo" / "report.html").is_file()
    assert (tmp_path / "demo" / "summary.json").is_file()


def test_the_readme_quickstart_runs_from_the_wheel(site, tmp_path):
    """docs/quickstart.py (the README's notebook quick start) against the installed package only:
    run from a temporary folder, so neither the repository's code nor its paths can be reached."""
    res = subprocess.run([sys.executable, str(ROOT / "docs" / "quickstart.py")],
                         capture_output=True, text=True, env=_env(site), cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert lines[0] == "3 traces; a dict reads as the same trace: True"
    assert "wrote 3 traces to run.h5" in lines
    assert re.fullmatch(r"trace \S+: \d+ tokens, L̂ [\d.]+ -> [\d.]+ nats over \d+ trajectory tokens",
                        lines[1]), lines[1]

"""The entry points: `python -m probes.run` refuses a local file that shadows the toolkit, the
`trajectory-probes` console script does not look in the working folder, and the top-level help
imports no subcommand."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from probes.commands import SUBCOMMANDS

ROOT = Path(__file__).resolve().parents[3]


def _env() -> dict[str, str]:
    # the toolkit importable from anywhere, as an installed package is
    return {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.mark.parametrize("shadow", ["hooks.py", "cache.py", "analyses.py", "cache/__init__.py"])
def test_python_m_refuses_a_shadowing_file(tmp_path, shadow):
    (tmp_path / shadow).parent.mkdir(exist_ok=True)
    (tmp_path / shadow).write_text("x = 1\n")
    out = subprocess.run([sys.executable, "-m", "probes.run", "inspect", "missing.h5"],
                         cwd=tmp_path, env=_env(), capture_output=True, text=True)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert str(tmp_path / shadow) in lines[0] and "shadows the toolkit" in lines[0]


def test_console_script_ignores_the_working_folder(tmp_path):
    script = shutil.which("trajectory-probes", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the trajectory-probes console script is not installed in this environment "
                    "(pip install -e . installs it)")
    (tmp_path / "hooks.py").write_text("x = 1\n")
    out = subprocess.run([script, "inspect", "missing.h5"], cwd=tmp_path, capture_output=True,
                         text=True)
    assert out.returncode == 2
    assert out.stderr.strip() == ("error: missing.h5 does not exist; check the path (or write a "
                                  "cache first)")


def test_top_level_help_imports_no_subcommand():
    code = ("import sys, probes.run as r\n"
            "try:\n    r.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith('probes.commands.') "
            "or m in ('torch', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
    for name, _, summary in SUBCOMMANDS:
        assert name in out.stdout and summary[:40] in " ".join(out.stdout.split())


def test_a_subcommand_help_imports_only_its_module():
    code = ("import sys, probes.run as r\n"
            "try:\n    r.main(['pack', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith('probes.commands.')))")
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "['probes.commands.flags', 'probes.commands.pack']"


HEAVY = ("torch", "transformers", "transformer_lens", "scipy", "h5py", "probes.pipeline.loop",
         "probes.readouts.compare", "probes.demo.run")
"""What no `--help` may import (bench/cli_help.py times them against `python -c pass`)."""


@pytest.mark.parametrize("name", [name for name, _, _ in SUBCOMMANDS])
def test_every_subcommand_help_stays_light(name):
    code = ("import sys, probes.run as r\n"
            f"try:\n    r.main([{name!r}, '--help'])\nexcept SystemExit:\n    pass\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert "usage: " in out.stdout


def test_command_names_agree_with_their_runners():
    """The CLI takes each name from the table; a runner stores its own (`WriteJob.command`)."""
    import importlib

    runners = {"cache": "probes.pipeline.capture", "lhat": "probes.pipeline.lhat",
               "updates": "probes.pipeline.updates", "landscape": "probes.pipeline.landscape",
               "anchors": "probes.pipeline.anchors", "effects": "probes.pipeline.effects",
               "fit": "probes.pipeline.fit", "grade": "probes.pipeline.generate.grade",
               "generate": "probes.pipeline.generate.settings", "compare": "probes.readouts.compare",
               "report": "probes.readouts.report.build", "inspect": "probes.readouts.inspect",
               "efficiency": "probes.readouts.efficiency",
               "compare-models": "probes.readouts.compare_models", "demo": "probes.demo.run"}
    for name, module in runners.items():
        assert name == importlib.import_module(module).NAME, module
    for name, module, _ in SUBCOMMANDS:
        assert name == importlib.import_module(module).NAME, module

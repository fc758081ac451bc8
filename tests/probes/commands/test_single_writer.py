"""One output, one writer, one model: what the checks before the model load cannot see.

- Two fresh runs on one new `--out`: the second finds the store the first created while it loaded
  the model (checked again under the writer lock) and is refused; the first's store is untouched.
- Two `generate` runs on one JSONL: the second is refused by the file's writer lock.
- `--resume` with a model folder whose weights changed in place is refused by the weights
  fingerprint; an unchanged folder resumes; a store that records no fingerprint still resumes.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import struct

import numpy as np
import pytest

import probes.pipeline.loop as load_module  # the write loop loads every model: patch it there
from cache import open_cache, segments_dir
from probes.reasoner.train import CHECKPOINT_DIR, SAMPLES_PATH
from probes.run import main
from tests.probes.commands._store_snapshot import snapshot


@pytest.fixture(scope="module")
def halves(tmp_path_factory):
    """Two traces files with different traces (two each)."""
    folder = tmp_path_factory.mktemp("single")
    lines = SAMPLES_PATH.read_text().splitlines(keepends=True)
    first, second = folder / "first.jsonl", folder / "second.jsonl"
    first.write_text("".join(lines[:2]))
    second.write_text("".join(lines[2:4]))
    return first, second


def _args(command, model, traces, out, *extra):
    return [command, "--model", str(model), "--device", "cpu", "--no-progress",
            "--traces", str(traces), "--out", str(out), *extra]


def _one_error(capsys, *needles):
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if line.startswith("error:")]
    assert len(err) == 1, err
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    return err[0]


def _ids(out):
    with open_cache(out) as reader:
        return sorted(tr.id for tr in reader)


@pytest.mark.parametrize("command", ["lhat", "cache"])
def test_a_store_created_while_the_model_loads_is_refused_untouched(command, halves, tmp_path,
                                                                    monkeypatch, capsys):
    first, second = halves
    out = tmp_path / "run.h5"
    real = load_module.load_model
    raced = []

    def load_while_another_run_writes(spec, **kw):
        if not raced:  # the second run has checked --out (new); the first one writes it now
            raced.append(True)
            assert main(_args(command, "tiny-reasoner", first, out)) == 0
            raced.append(snapshot(out))
        return real(spec, **kw)

    monkeypatch.setattr(load_module, "load_model", load_while_another_run_writes)
    assert main(_args(command, "tiny-reasoner", second, out)) == 2
    _one_error(capsys, str(out), "already exists", "--resume", "nothing of it was changed",
               "another writer may have created it")
    assert snapshot(out) == raced[1]
    firsts = sorted(json.loads(line)["id"] for line in first.read_text().splitlines())
    assert _ids(out) == firsts


# -- generate ------------------------------------------------------------------------------------


def test_a_second_generate_on_one_jsonl_is_refused(tmp_path, monkeypatch, capsys):
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"id": "q1", "question": "1+1?", "answer": "2"}\n')
    out = tmp_path / "samples.jsonl"
    argv = ["generate", "--model", "tiny-reasoner", "--device", "cpu", "--no-progress",
            "--questions", str(questions), "--out", str(out), "--max-new-tokens", "4"]
    real = load_module.load_model
    raced = []

    def load_while_another_run_writes(spec, **kw):
        if not raced:  # the second run has checked --out (new); the first writes it meanwhile
            raced.append(True)
            assert main(argv) == 0
            raced.append(out.read_bytes())
        return real(spec, **kw)

    monkeypatch.setattr(load_module, "load_model", load_while_another_run_writes)
    assert main(argv) == 2
    _one_error(capsys, str(out), "--resume")
    assert out.read_bytes() == raced[1]
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["q1-s0"]


def test_generate_refuses_a_jsonl_another_process_is_writing(tmp_path, capsys):
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"id": "q1", "question": "1+1?", "answer": "2"}\n')
    out = tmp_path / "samples.jsonl"
    argv = ["generate", "--model", "tiny-reasoner", "--device", "cpu", "--no-progress",
            "--questions", str(questions), "--out", str(out), "--max-new-tokens", "4", "--resume"]
    out.write_bytes(b"")
    fd = os.open(out, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held as a live generate run holds it
        assert main(argv) == 2
        _one_error(capsys, str(out), "another run is writing it")
    finally:
        os.close(fd)
    assert out.read_bytes() == b""
    assert main(argv) == 0


# -- weights fingerprint -------------------------------------------------------------------------


def _bump_one_tensor(folder):
    """Add 1 to every value of one tensor of model.safetensors, in place (headers unchanged)."""
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    name = sorted(k for k in header if k != "__metadata__")[0]
    info = header[name]
    assert info["dtype"] == "F32", info
    a, b = (8 + n + o for o in info["data_offsets"])
    values = np.frombuffer(bytes(data[a:b]), dtype="<f4") + np.float32(1)
    data[a:b] = values.astype("<f4").tobytes()
    path.write_bytes(bytes(data))


@pytest.fixture
def model_copy(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(CHECKPOINT_DIR, folder)
    return folder


def test_resume_with_changed_weights_is_refused_naming_both_fingerprints(model_copy, halves,
                                                                         tmp_path, capsys):
    first, _ = halves
    out = tmp_path / "run.h5"
    assert main(_args("lhat", model_copy, first, out, "--limit", "1")) == 0
    assert main(_args("lhat", model_copy, first, out, "--resume")) == 0  # unchanged: resumes
    assert _ids(out) == sorted(json.loads(x)["id"] for x in first.read_text().splitlines())
    capsys.readouterr()
    kept = snapshot(out)
    _bump_one_tensor(model_copy)
    assert main(_args("lhat", model_copy, first, out, "--resume")) == 2
    err = _one_error(capsys, str(out), "weights", "another --out")
    assert snapshot(out) == kept

    from probes.models.identity import weights_fingerprint_of_folder

    with open_cache(out) as reader:
        before = reader.metadata["weights_fingerprint"]
    after = weights_fingerprint_of_folder(model_copy)
    assert before != after and f"stored {before}, this run {after}" in err


def test_the_built_in_model_has_a_stable_fingerprint():
    from probes.models.identity import weights_fingerprint
    from probes.models.load import load_model

    a = weights_fingerprint(load_model("tiny-reasoner", device="cpu"))
    b = weights_fingerprint(load_model("tiny-reasoner", device="cpu"))
    assert a == b and a.startswith("files:") and len(a) == len("files:") + 64


def test_an_in_memory_model_is_fingerprinted_by_its_values():
    import torch

    from probes.models.identity import weights_fingerprint
    from tests.hooks._models import build_tiny

    loaded = build_tiny("llama")
    before = weights_fingerprint(loaded)
    assert weights_fingerprint(loaded) == before
    with torch.no_grad():
        next(loaded.hf_model.parameters()).add_(1.0)
    assert weights_fingerprint(loaded) != before


def test_a_store_without_a_fingerprint_still_resumes_and_says_so(model_copy, halves, tmp_path,
                                                                 capsys):
    """A store written before fingerprints were recorded: its index and segments lose the root
    attribute; --resume adds the rest, naming what it cannot check."""
    import h5py

    first, _ = halves
    out = tmp_path / "run.h5"
    assert main(_args("lhat", model_copy, first, out, "--limit", "1")) == 0
    for path in [out, *sorted(segments_dir(out).glob("*.h5"))]:
        with h5py.File(path, "r+") as f:
            if "weights_fingerprint" in f.attrs:
                del f.attrs["weights_fingerprint"]
    capsys.readouterr()
    assert main(_args("lhat", model_copy, first, out, "--resume")) == 0
    err = capsys.readouterr().err
    assert "records no weights fingerprint" in err and "not checked" in err
    assert len(_ids(out)) == 2

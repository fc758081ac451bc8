"""`python -m probes.run pack`: one self-contained file; bad --out refused before any work."""

from __future__ import annotations

import numpy as np

from cache import open_cache, open_writer, segments_dir
from probes.run import main

META = {"model": "m", "architecture": {"family": "toy"}, "model_dtype": "float32",
        "weight_convention": "hf", "tokenizer_fingerprint": "t", "lexicon_fingerprint": "l",
        "category_codes": {"ordinary": 0}, "config": {}}


def _store(path):
    with open_writer(path, metadata=META) as writer:
        for i in range(2):
            writer.write_trace(f"q/{i}", tokens=np.arange(5) + i, category=np.zeros(5, np.uint8),
                               sites={"resid_post": np.full((5, 2, 4), i, np.float32)})
    return path


def _error(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for needle in needles:
        assert needle in err[0], (needle, err[0])


def test_pack_command(tmp_path, capsys):
    store = _store(tmp_path / "run.h5")
    packed = tmp_path / "one.h5"
    assert main(["pack", str(store), "--out", str(packed)]) == 0
    assert "pack: 2 traces" in capsys.readouterr().out
    assert not segments_dir(packed).exists()
    with open_cache(packed) as reader:
        assert reader.trace_ids() == ["q/0", "q/1"]
        assert reader.trace("q/1")["resid_post"][...].tobytes() == np.full(
            (5, 2, 4), 1, np.float32).tobytes()
    assert main(["inspect", str(store)]) == 0
    assert "segment files" in capsys.readouterr().out

    assert main(["pack", str(store), "--out", str(packed)]) == 2
    _error(capsys, str(packed), "already exists", "--overwrite")
    assert main(["pack", str(store), "--out", str(packed), "--overwrite", "--json"]) == 0
    capsys.readouterr()
    assert main(["pack", str(store), "--out", str(tmp_path)]) == 2
    _error(capsys, "is a directory")
    assert main(["pack", str(store), "--out", str(tmp_path / "no" / "x.h5")]) == 2
    _error(capsys, "does not exist")
    assert main(["pack", str(tmp_path / "none.h5"), "--out", str(tmp_path / "x.h5")]) == 2
    _error(capsys, "none.h5", "does not exist")
    assert main(["pack", str(store), "--out", str(store)]) == 2
    _error(capsys, "the cache itself")

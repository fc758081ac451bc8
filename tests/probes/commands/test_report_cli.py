"""`report` end to end on tiny-reasoner, checked without a browser: the HTML structure (inline
images that decode, no network, one coloured span per trajectory token with its text), the same
numbers as `compare`, Markdown, user errors, the demo's last step, and the per-token DataFrame of
a real run equal to the arrays in the cache."""

from __future__ import annotations

import base64
import json
import re
import shutil
from html.parser import HTMLParser

import numpy as np
import pytest

import probes.run
from cache import open_cache
from probes.errors import ProbesError
from probes.readouts.report.build import report_demo
from tests.probes.commands._report_run import small_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def main(argv: list[str]) -> int:
    """`trajectory-probes report ...` (`probes.run.main`)."""
    return probes.run.main(argv)


class Structure(HTMLParser):
    """Images, external references, and the token spans of each view."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.external: list[str] = []
        self.views: dict[str, list[dict]] = {}
        self.section_ids: list[str] = []
        self._view: str | None = None
        self._span: dict | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("src", "href"):
            if re.match(r"^(https?:)?//", a.get(key) or ""):
                self.external.append(a[key])
        if tag == "script" and "src" in a:
            self.external.append(a["src"])
        if tag == "img":
            self.images.append(a["src"])
        if tag == "section":
            self.section_ids.append(a["id"])
        if tag == "div" and a.get("class") == "view":
            self._view = a["data-trace"]
            self.views[self._view] = []
        if tag == "span" and self._view and "t" in (a.get("class") or "").split():
            self._span = {**a, "text": ""}
            self.views[self._view].append(self._span)

    def handle_endtag(self, tag):
        if tag == "span":
            self._span = None

    def handle_data(self, data):
        if self._span is not None:
            self._span["text"] += data


@pytest.fixture(scope="module")
def run():
    return small_run()


@pytest.fixture(scope="module")
def html_report(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.html"
    assert main(["report", str(run.run), "--control", str(run.control), "--out", str(out),
                 "--compare-json", str(run.compare_json), "--traces", "3", "--quiet"]) == 0
    return out


def _trajectories(path):
    with open_cache(path) as reader:
        return {tr.id: (tr.tokens, tr.spans["trajectory"], tr.category) for tr in reader}


def test_html_is_self_contained_with_one_coloured_span_per_token(run, html_report, capsys):
    page = Structure()
    page.feed(html_report.read_text(encoding="utf-8"))
    assert page.external == []
    plots = json.loads(run.compare_json.read_text())["plots"]
    assert len(page.images) == len(plots) > 0
    for src in page.images:
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG_SIGNATURE
    assert {"run", "tokens", "lhat", "updates", "fit", "sites"} <= set(page.section_ids)
    from probes.models.load import load_tokenizer

    tok = load_tokenizer("tiny-reasoner")
    traces = _trajectories(run.run)
    assert len(page.views) == 3
    assert list(page.views)[0] == next(i for i, (_, (a, b), c) in traces.items() if (c[a:b] == 1).any())
    for tid, spans in page.views.items():
        ids, (a, b), cats = traces[tid]
        assert len(spans) == b - a
        assert "".join(s["text"] for s in spans) == tok.decode(ids[a:b].tolist())
        marked = [j for j, s in enumerate(spans) if "c1" in s["class"].split()]
        assert marked == list(np.flatnonzero(cats[a:b] == 1))
        assert f"position {a}, trajectory token 0" in spans[0]["title"]
        assert sum("style" in s for s in spans) > (b - a) // 2  # coloured by ΔL̂


def test_report_uses_the_numbers_of_compare(run, tmp_path, capsys):
    """The report that runs `compare` itself and the one given its saved JSON are the same."""
    fresh, saved = tmp_path / "fresh.md", tmp_path / "saved.md"
    assert main(["report", str(run.run), "--control", str(run.control), "--format", "md",
                 "--n-boot", "200", "--out", str(fresh), "-q"]) == 0
    assert main(["report", str(run.run), "--control", str(run.control), "--format", "md",
                 "--compare-json", str(run.compare_json), "--n-boot", "200",  # the efficiency
                 "--out", str(saved), "-q"]) == 0                          # section's own CIs
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith(f"report: 4 traces, tables -> {saved} (")

    def body(path):
        return [line for line in path.read_text().splitlines()
                if not line.startswith(("Statistics:", "Written by"))]

    assert body(fresh) == body(saved)
    text = saved.read_text()
    assert "| comparison | traces | median a [95% CI] |" in text
    assert "random-init effect" in text
    # tokens per category as the cache counts them
    with open_cache(run.run) as reader:
        cats = np.concatenate([tr.category for tr in reader])
        codes = reader.category_codes
    for name, code in codes.items():
        assert f"| {name} | {int((cats == code).sum())} |" in text


def test_colour_by_and_per_layer_keys(run, tmp_path):
    out = tmp_path / "r.html"
    assert main(["report", str(run.run), "--compare-json", str(run.compare_json), "--control",
                 str(run.control), "--out", str(out), "--colour-by", "upd_m7", "--trace-id",
                 "tr-2-1", "-q"]) == 0
    text = out.read_text()
    data = json.loads(re.search(r'id="probes-data">(.*?)</script>', text, re.S).group(1))
    assert data["default_key"] == "upd_m7@mean" and [v["id"] for v in data["views"]] == ["tr-2-1"]
    assert {"lhat_delta", "upd_m7@mean", "upd_m7@0", "upd_m7@3"} <= set(data["labels"])
    assert "upd_m7@0" not in data["hover"]
    with open_cache(run.run) as reader:
        m7 = reader.trace("tr-2-1")["upd_m7"][:]
    vals = np.array(data["views"][0]["values"]["upd_m7@3"], dtype=float)
    np.testing.assert_allclose(vals, m7[3], rtol=1e-3)


def test_activations_only_cache_and_user_errors(run, tmp_path, capsys):
    out = tmp_path / "sites.html"
    assert main(["report", str(run.sites_only), "--out", str(out), "-q"]) == 0
    page = Structure()
    page.feed(out.read_text())
    assert len(page.views) == 2 and page.images == []
    assert "no L̂ curves or update arrays yet" in out.read_text()
    capsys.readouterr()
    bad = [
        (["--trace-id", "nope"], "--trace-id ['nope'] not among the 4 complete traces"),
        (["--colour-by", "nope"], "--colour-by 'nope' is not a per-token array"),
        (["--compare-json", str(run.compare_json)], "--compare-json"),
        (["--format", "md", "--screenshot", str(tmp_path / "x.png")], "--screenshot renders the HTML"),
    ]
    for extra, message in bad:
        code = main(["report", str(run.run), "--out", str(tmp_path / "x.html"), "-q", *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    code = main(["report", str(run.sites_only), "--control", str(run.control), "-q"])
    assert code == 2 and "has none; run `updates` first" in capsys.readouterr().err


def test_report_demo_writes_the_report_and_a_short_summary(run, tmp_path):
    folder = tmp_path / "demo-out"
    folder.mkdir()
    for name in ("run.h5", "random_init.h5"):
        shutil.copy(run.root / name, folder / name)
    saved = json.loads(run.compare_json.read_text())
    saved["cache"] = str(folder / "run.h5")
    saved["updates"]["control"] = str(folder / "random_init.h5")
    (folder / "compare.json").write_text(json.dumps(saved))
    (folder / "summary.json").write_text(json.dumps(
        {"answer_accuracy": 1.0, "answer_accuracy_no_trajectory": 0.0, "seconds": 80.0}))
    path, lines = report_demo(folder)
    assert path == folder / "report.html" and path.is_file()
    assert 4 <= len(lines) <= 15
    assert lines[1] == "greedy answer accuracy 1.000 with the trajectory, 0.000 without"
    assert any(line.startswith(f"report: {path} (") for line in lines)
    assert re.match(r"took \d+s; every number: ", lines[-1])
    page = Structure()
    page.feed(path.read_text())
    assert len(page.images) == len(saved["plots"])


def test_token_table_of_a_real_run_equals_the_cache(run):
    pytest.importorskip("pandas", reason="cache.tables needs pandas (the `tables` extra)")
    from cache.tables import token_table
    from probes.models.cache_text import cache_decoder, phrase_names

    names = phrase_names(run.run)
    assert names is not None and "wait" in names
    df = token_table(run.run, decode=cache_decoder(run.run), phrase_names=names)
    with open_cache(run.run) as reader:
        assert len(df) == sum(tr.n_tokens for tr in reader)
        for tr in reader:
            rows = df[df.trace_id == tr.id]
            a, b = tr.spans["trajectory"]
            traj = rows.iloc[a:b]
            assert np.array_equal(rows.token.to_numpy(), tr.tokens)
            for name in ("lhat_delta", "lhat_rho", "lhat_log_ratio"):
                np.testing.assert_array_equal(traj[name].to_numpy(), tr[name][:])
            np.testing.assert_array_equal(traj["lhat"].to_numpy(), tr["lhat"][1:])
            for name in ("upd_m7", "upd_sigma_gate", "upd_contrib"):
                for layer, row in enumerate(tr[name][:]):
                    np.testing.assert_array_equal(traj[f"{name}_L{layer}"].to_numpy(), row)
            got = [None if isinstance(x, float) or x is None else x for x in rows.phrase.astype(object)]
            assert got == [names[i] if i >= 0 else None for i in tr["phrase_id"][:]]
    from probes.models.load import load_tokenizer

    tok = load_tokenizer("tiny-reasoner")
    first = df[df.trace_id == df.trace_id.iloc[0]]
    assert "".join(first.text) == tok.decode(first.token.tolist())


def test_token_ids_are_shown_when_the_tokenizer_cannot_be_loaded(run, tmp_path, monkeypatch, capsys):
    import probes.readouts.report.scan as scan  # the report's decoder, where the report looks it up

    def unavailable(meta):
        raise ProbesError("no tokenizer files here")

    monkeypatch.setattr(scan, "cache_decoder", unavailable)
    out = tmp_path / "ids.html"
    assert main(["report", str(run.run), "--control", str(run.control), "--compare-json",
                 str(run.compare_json), "--trace-id", "tr-2-0", "--out", str(out), "-q"]) == 0
    assert capsys.readouterr().out.startswith("note: token ids shown instead of text")
    page = Structure()
    page.feed(out.read_text())
    ids, (a, b), _ = _trajectories(run.run)["tr-2-0"]
    assert [s["text"] for s in page.views["tr-2-0"]] == [f"[{i}]" for i in ids[a:b]]
    assert "token ids shown instead of text: the tokenizer of &#x27;tiny-reasoner&#x27; could not be " \
           "loaded here (no tokenizer files here)" in out.read_text()

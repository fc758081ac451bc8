"""`python -m probes.run report run.h5 [--control random_init.h5]`: one self-contained HTML report
of a cache (or its tables as Markdown), from the cache alone (no model).

The report shows the run's identity (model, architecture, dtype, versions, lexicon, traces and
tokens per category), the headline findings, token heat maps of a few traces (each trajectory
token coloured by a chosen per-token array: ΔL̂, ρ, σ, M7, ...; hover for the token, its position
and values), and a section per analysis the cache holds (L̂ curves, implicit updates, the
behaviour fit, activation sites) with `compare`'s tables and every plot it draws, embedded.

Every number comes from `probes.commands.compare.compare_cache` and `report_json` (the same code
path as `compare --json`); `--compare-json` reads a saved `compare --json` output of the same
cache instead of recomputing. The rendering is `analyses.report` (plain data in, HTML out).
`report_demo` is the demo's last step.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from analyses.report import (
    Block,
    Collapsed,
    Plot,
    Report,
    Section,
    Table,
    TokenKey,
    TokenView,
    fit_table,
    fmt,
    lhat_comparison_table,
    render_html,
    render_markdown,
    trend_lines,
    update_comparison_table,
)
from probes import __version__, arrays
from probes.commands import flags
from probes.commands.compare import CompareConfig, compare_cache, report_json
from probes.commands.loop import human_size
from probes.commands.progress import Stages, progress_on, quiet_flag
from probes.errors import ProbesError

NAME = "report"

FORMATS: tuple[str, ...] = ("html", "md")
"""`--format`: one self-contained HTML page, or its tables as Markdown."""

DEFAULT_VIEWS = 6
"""Traces shown as token heat maps unless `--traces` says otherwise."""

LAYER_VALUE_BUDGET = 1_500_000
"""Per-layer colouring keys are offered while (per-layer keys x shown tokens) stays below this;
above it only the mean over layers is (the page stays a few MB)."""

DEMO_N_BOOT = 1000
"""Bootstrap resamples of the demo's comparison (`probes.commands.demo`)."""

_LHAT_VIEW = ("lhat", "lhat_delta", "lhat_rho", "lhat_log_ratio")
_LHAT_LABELS = {"lhat": "L̂ after the token", "lhat_delta": "ΔL̂", "lhat_rho": "ρ (RaML)",
                "lhat_log_ratio": "Δ log L̂"}
_PREFERRED_DEFAULT = ("lhat_delta", "upd_m7@mean", "upd_sigma_gate@mean")
_METRIC_NAMES = {"abs_delta": "|ΔL̂|", "delta": "ΔL̂", "rho": "ρ", "lam": "Δ log L̂",
                 "abs_lam": "|Δ log L̂|"}
"""How the headline names `compare --metric` values."""


@dataclass(frozen=True, kw_only=True)
class ReportConfig:
    """Settings of a `report` run.

    Attributes:
        control: A cache of the same traces from `updates --control random-init` (passed to
            `compare` as its `control`).
        n_views: Traces shown as token heat maps (the first ones with a reflection, then the
            others, in cache order), unless `trace_ids` names them.
        trace_ids: Traces to show as heat maps.
        colour_by: The per-token array coloured when the page opens (e.g. "lhat_delta",
            "upd_m7" = its mean over layers, "upd_m7@2" = layer 2); None: ΔL̂ if present.
        n_boot: Bootstrap resamples of `compare`.
        seed: Seed of `compare`.
        format: "html" or "md".
        compare_json: A saved `compare --json` output of this cache to use instead of running
            `compare` (its plots are embedded from the paths it lists).
    """

    control: Path | None = None
    n_views: int = DEFAULT_VIEWS
    trace_ids: tuple[str, ...] = ()
    colour_by: str | None = None
    n_boot: int = 2000
    seed: int = 0
    format: str = "html"
    compare_json: Path | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ProbesError(f"--format {self.format!r} is not one of {list(FORMATS)}")
        if self.n_views < 0:
            raise ProbesError(f"--traces must be at least 0, got {self.n_views}")


@dataclass
class ReportResult:
    """What `write_report` wrote.

    Attributes:
        out: The report file.
        format: "html" or "md".
        bytes: Its size.
        n_traces: Complete traces in the cache.
        n_views: Token heat maps.
        n_view_tokens: Trajectory tokens in them.
        n_plots: Plots embedded.
        seconds: Wall time.
        headline: The report's summary lines.
        notes: Caveats (e.g. token ids shown because the tokenizer could not be loaded).
    """

    out: Path
    format: str
    bytes: int = 0
    n_traces: int = 0
    n_views: int = 0
    n_view_tokens: int = 0
    n_plots: int = 0
    seconds: float = 0.0
    headline: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """The one line the command ends with: what was written where."""
        what = f"{self.n_views} token heat maps ({self.n_view_tokens} tokens), {self.n_plots} plots"
        if self.format == "md":
            what = "tables"
        return (f"report: {self.n_traces} traces, {what} -> {self.out} "
                f"({human_size(self.bytes)}, {self.seconds:.1f}s)")


# --------------------------------------------------------------------------------------------------
# Reading the cache


@dataclass
class _Scan:
    """What the report needs to know about a cache before the comparison."""

    path: Path
    meta: dict[str, Any]
    ids: list[str]
    n_incomplete: int
    tokens: dict[str, int]
    traces_with: dict[str, int]
    n_lhat: int
    n_updates: int
    sites: dict[str, Any]
    reflective: list[str]
    file_bytes: int


def _scan(path: Path) -> _Scan:
    from cache import open_cache

    with open_cache(path) as reader:
        meta = dict(reader.metadata)
        codes = dict(sorted(reader.category_codes.items(), key=lambda kv: kv[1]))
        names = {int(v): k for k, v in codes.items()}
        tokens = dict.fromkeys(codes, 0)
        traces_with = dict.fromkeys(codes, 0)
        ids, reflective, n_lhat, n_upd = [], [], 0, 0
        for tr in reader:
            ids.append(tr.id)
            counts = np.bincount(np.asarray(tr.category, np.int64), minlength=max(names) + 1)
            for code, name in names.items():
                tokens[name] += int(counts[code])
                traces_with[name] += int(counts[code] > 0)
            present = tr.names()
            n_lhat += "lhat" in present
            n_upd += "upd_contrib" in present
            if counts[codes["reflection"]] > 0:
                reflective.append(tr.id)
        sites = {name: {"dtype": s.dtype, "row_shape": list(s.row_shape), "layers": list(s.layers)}
                 for name, s in reader.sites.items()}
        n_incomplete = len(reader.incomplete_ids())
    return _Scan(path, meta, ids, n_incomplete, tokens, traces_with, n_lhat, n_upd, sites,
                 reflective, os.path.getsize(path))


def _pick_views(scan: _Scan, cfg: ReportConfig) -> list[str]:
    if cfg.trace_ids:
        unknown = [i for i in cfg.trace_ids if i not in set(scan.ids)]
        if unknown:
            raise ProbesError(f"--trace-id {unknown} not among the {len(scan.ids)} complete traces of "
                              f"{scan.path} (e.g. {scan.ids[:5]})")
        return list(cfg.trace_ids)
    chosen = set(scan.reflective[:cfg.n_views])
    rest = [i for i in scan.ids if i not in chosen][:max(0, cfg.n_views - len(chosen))]
    chosen |= set(rest)
    return [i for i in scan.ids if i in chosen]


def _decoder(meta: dict[str, Any]) -> tuple[Any, str]:
    """The token-text decoder of the cache's tokenizer, or (None, why not)."""
    from probes.models.cache_text import cache_decoder

    try:
        return cache_decoder(meta), ""
    except (ProbesError, OSError, ValueError) as err:
        return None, (f"token ids shown instead of text: the tokenizer of {meta.get('model')!r} "
                      f"could not be loaded here ({err})")


def _read_view(tr: Any, decode: Any, names: list[str] | None) -> dict[str, Any]:
    """One trace's token texts, labels, values (keyed as the colouring keys) and [L, T] arrays."""
    ids = np.asarray(tr.tokens)
    present = set(tr.names())
    pieces = decode(ids.tolist()) if decode is not None else [f"[{int(i)}]" for i in ids]
    phrase_ids = np.asarray(tr["phrase_id"][...]) if "phrase_id" in present else np.full(len(ids), -1)
    phrase = [(names[p] if names is not None and 0 <= p < len(names) else f"phrase {p}") if p >= 0
              else "" for p in phrase_ids.tolist()]
    values: dict[str, np.ndarray] = {}
    for name in _LHAT_VIEW:
        if name in present:
            v = np.asarray(tr[name][...], np.float64)
            values[name] = v[1:] if name == "lhat" else v
    layered = {n: np.asarray(tr[n][...], np.float64) for n in arrays.names(arrays.UPDATES) if n in present}
    for name, v in layered.items():
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns stay NaN
            values[f"{name}@mean"] = np.nanmean(v, axis=0)
    try:
        layer_ids = [int(x) for x in json.loads(str(tr.attrs.get("upd_layers", "[]")))]
    except (TypeError, ValueError):
        layer_ids = []
    return {"id": tr.id, "pieces": list(pieces), "category": np.asarray(tr.category), "phrase": phrase,
            "span": tuple(tr.spans["trajectory"]), "values": values, "layered": layered,
            "layers": layer_ids}


def _token_views(scan: _Scan, ids: list[str], stages: Stages) -> tuple[list[TokenView], list[TokenKey], str]:
    """The heat-map traces and the keys they can be coloured by; a note ("" if none)."""
    from cache import open_cache
    from probes.models.cache_text import phrase_names

    if not ids:
        return [], [], ""
    decode, note = _decoder(scan.meta)
    names = phrase_names(scan.meta)
    raw = []
    with open_cache(scan.path) as reader:
        for tid in ids:
            stages.step(f"token view {tid}")
            raw.append(_read_view(reader.trace(tid), decode, names))
            stages.advance(tokens=raw[-1]["span"][1] - raw[-1]["span"][0])
    keys, layer_note = _keys(raw)
    note = "; ".join(n for n in (note, layer_note) if n)
    views = [TokenView(trace_id=r["id"], pieces=r["pieces"], category=r["category"], phrase=r["phrase"],
                       traj_span=r["span"], values=r["values"], note=note) for r in raw]
    return views, keys, note


def _keys(raw: list[dict[str, Any]]) -> tuple[list[TokenKey], str]:
    """Colouring keys present in every view: L̂ arrays, each update's mean over layers, and each
    layer while the page stays small (their values are added to the views' values)."""
    common = set.intersection(*(set(r["values"]) for r in raw))
    keys = [TokenKey(n, f"{_LHAT_LABELS[n]} ({n})", _units(n), "L̂") for n in _LHAT_VIEW if n in common]
    upd = [n for n in arrays.names(arrays.UPDATES) if all(n in r["layered"] for r in raw)]
    n_tokens = sum(r["span"][1] - r["span"][0] for r in raw)
    n_layers = max((raw[0]["layered"][n].shape[0] for n in upd), default=0)
    per_layer = len(upd) * n_layers * n_tokens <= LAYER_VALUE_BUDGET
    layer_ids = raw[0]["layers"] if len(raw[0]["layers"]) == n_layers else list(range(n_layers))
    for name in upd:
        keys.append(TokenKey(f"{name}@mean", f"{name} · mean over layers", _units(name), name))
        if not per_layer:
            continue
        for row, layer in enumerate(layer_ids):
            keys.append(TokenKey(f"{name}@{layer}", f"{name} · layer {layer}", _units(name), name,
                                 hover=False))
            for r in raw:
                r["values"][f"{name}@{layer}"] = r["layered"][name][row]
    note = "" if per_layer or not upd else (
        f"per-layer colouring left out ({len(upd)} arrays x {n_layers} layers x {n_tokens} tokens "
        "is too much for one page); the mean over layers is shown")
    return keys, note


def _units(name: str) -> str:
    decl = arrays.BY_NAME.get(name)
    if decl is None:
        return ""
    return f"{decl.meaning}; {decl.units}" if decl.units else decl.meaning


def _default_key(keys: list[TokenKey], wanted: str | None) -> str | None:
    known = [k.key for k in keys]
    if wanted is not None:
        for candidate in (wanted, f"{wanted}@mean"):
            if candidate in known:
                return candidate
        raise ProbesError(f"--colour-by {wanted!r} is not a per-token array of the shown traces; "
                          f"choose one of {known}")
    return next((k for k in _PREFERRED_DEFAULT if k in known), known[0] if known else None)


# --------------------------------------------------------------------------------------------------
# The comparison


def _compare(scan: _Scan, cfg: ReportConfig, stages: Stages) -> tuple[dict[str, Any] | None, list[Plot]]:
    """`compare`'s JSON report and its plots (None, [] when the cache has nothing to compare)."""
    if not scan.n_lhat and not scan.n_updates:
        if cfg.control is not None:
            raise ProbesError(f"--control compares update arrays, but {scan.path} has none; run "
                              "`updates` first")
        return None, []
    if cfg.compare_json is not None:
        stages.step(f"reading {cfg.compare_json}")
        report = _read_compare_json(cfg.compare_json, scan.path, cfg.control)
        return report, _plots(report.get("plots", []))
    with tempfile.TemporaryDirectory(prefix="probes-report-") as folder, \
            stages.working(f"comparing {len(scan.ids)} traces (compare)"):
        raw = compare_cache(scan.path, CompareConfig(n_boot=cfg.n_boot, seed=cfg.seed,
                                                     plots=Path(folder), control=cfg.control))
        report = report_json(raw)
        return report, _plots(report.get("plots", []))


def _read_compare_json(file: Path, path: Path, control: Path | None) -> dict[str, Any]:
    """A saved `compare --json` output, checked to belong to `path` (and `control`)."""
    try:
        report = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ProbesError(f"--compare-json {file}: cannot read it as JSON ({err})") from None
    cache = report.get("cache") if isinstance(report, dict) else None
    if cache is None or Path(cache).resolve() != path.resolve():
        raise ProbesError(f"--compare-json {file} compares {cache!r}, not {path}; run `python -m "
                          f"probes.run compare {path} --json` again")
    stored = (report.get("updates") or {}).get("control")
    if (stored is None) != (control is None) or (
            stored is not None and Path(stored).resolve() != Path(control).resolve()):
        raise ProbesError(f"--compare-json {file} was made with control {stored!r}, the report is "
                          f"asked for {None if control is None else str(control)!r}; pass the same "
                          "--control")
    newest = max(p.stat().st_mtime for p in (path, control) if p is not None)
    if file.stat().st_mtime < newest:
        raise ProbesError(f"--compare-json {file} is older than the caches it compares; run "
                          "`compare --json` again")
    return report


def _plots(paths: list[str]) -> list[Plot]:
    return [Plot(_plot_title(Path(p).stem), Path(p).read_bytes(), Path(p).name)
            for p in paths if Path(p).is_file()]


def _plot_title(stem: str) -> str:
    """A caption from the file names `compare` gives its plots."""
    if stem.startswith("categories_"):
        return f"{stem[len('categories_'):]} per category and control (pooled tokens)"
    if stem.startswith("lhat_"):
        return f"L̂ along trace {stem[len('lhat_'):]} (reflection red, delimiter green)"
    if stem.startswith("heatmap_"):
        rest = stem[len("heatmap_"):]
        for suffix, what in (("_ratio", "relative to ordinary tokens"),
                             ("_random_init", "random-init control")):
            if rest.endswith(suffix):
                return f"{rest[:-len(suffix)]}: {what}, per category and layer"
        return f"{rest}: median per category and layer"
    if stem.startswith("steps_"):
        return f"{stem[len('steps_'):]}: along one trace, per layer"
    return stem


# --------------------------------------------------------------------------------------------------
# Assembling the page


def _identity(scan: _Scan, control: Path | None) -> list[Table]:
    m, arch = scan.meta, scan.meta.get("architecture", {})
    cfg, info = m.get("config", {}), m.get("info", {})
    lexicon_files = info.get("lexicon_files") or ["built-in"]
    run = [
        ["cache", f"{scan.path} ({human_size(scan.file_bytes)})"],
        ["model", m.get("model")],
        ["architecture", f"{arch.get('family')}, {arch.get('n_layers')} layers, d_model "
                         f"{arch.get('d_model')}, {arch.get('n_heads')} heads ({arch.get('n_kv_heads')} KV), "
                         f"d_mlp {arch.get('d_mlp')}, {arch.get('norm')}, {arch.get('positional')}, "
                         f"vocab {arch.get('vocab_size')}, context {arch.get('n_ctx')}"],
        ["model dtype", m.get("model_dtype")],
        ["stored", f"sites {', '.join(cfg.get('sites', {})) or 'none'} on {cfg.get('positions', '?')} "
                   f"tokens, {cfg.get('storage_dtype', '?')}"],
        ["lexicon", f"{', '.join(Path(f).name for f in lexicon_files)} "
                    f"(fingerprint {str(m.get('lexicon_fingerprint', ''))[:12]})"],
        ["tokenizer", f"fingerprint {str(m.get('tokenizer_fingerprint', ''))[:12]}"],
        ["traces", f"{len(scan.ids)} complete" + (f", {scan.n_incomplete} interrupted"
                                                  if scan.n_incomplete else "")],
        ["created", f"{m.get('created')} by trajectory-probes {m.get('toolkit_version')}"],
        ["versions", ", ".join(f"{k} {v}" for k, v in sorted(m.get("versions", {}).items()))],
    ]
    if control is not None:
        run.append(["random-init control", str(control)])
    counts = [[name, fmt(n), fmt(scan.traces_with[name])] for name, n in scan.tokens.items()]
    counts.append(["all", fmt(sum(scan.tokens.values())), fmt(len(scan.ids))])
    held = [["L̂ curves (lhat)", fmt(scan.n_lhat)], ["implicit updates (updates)", fmt(scan.n_updates)]]
    held += [[f"site {n} {s['dtype']} {s['row_shape']}", fmt(len(scan.ids))] for n, s in scan.sites.items()]
    return [Table(["", ""], run, caption="run"),
            Table(["category", "tokens", "traces with it"], counts, caption="tokens per category"),
            Table(["analysis", "traces"], held, caption="what the cache holds")]


def headline_lines(scan_counts: dict[str, Any], compare: dict[str, Any] | None) -> list[str]:
    """The report's summary lines: size of the run, L̂ trend, reflections vs ordinary tokens,
    the update comparisons and the behaviour fit (those present)."""
    lines = [f"{scan_counts['n_traces']} traces of {scan_counts['model']}: "
             f"{scan_counts['tokens']} tokens, {scan_counts['reflection']} reflection and "
             f"{scan_counts['delimiter']} delimiter tokens ({scan_counts['with_reflection']} traces "
             "with a reflection)"]
    if compare is None:
        return [*lines, "no L̂ curves or update arrays yet: run `lhat` and/or `updates` on it"]
    if "trend" in compare:
        t = compare["trend"]
        lines.append(f"L̂ falls along the trajectory in {fmt(t.get('share_falling'), '.0%')} of traces "
                     f"(median change {fmt(t.get('median_change'))} nats)")
        row = next((r for r in compare["table"]["rows"]
                    if (r["a"], r["b"]) == ("reflection", "ordinary")), None)
        if row is not None:
            meta = compare["table"]["meta"]
            metric = _METRIC_NAMES.get(meta.get("metric"), meta.get("metric"))
            lo, hi = row["ci_median_diff"]
            lines.append(f"reflection vs ordinary tokens, per-trace {meta.get('statistic')} {metric} "
                         f"({row['n_traces']} traces): difference "
                         f"{fmt(row['median_diff'])} [{fmt(lo)}, {fmt(hi)}], Holm p "
                         f"{fmt(row['p_holm'], '.2g')}")
    if "updates" in compare:
        lines += _update_headline(compare["updates"])
    fits = (compare.get("fit") or {}).get("fits", {})
    if "delta" in fits:
        f = fits["delta"]
        lo, hi = f["ci"]["categories"]
        lines.append(f"ΔL̂ per token explained out of fold: R² {fmt(f['r2']['full'])}; partial R² of "
                     f"the categories {fmt(f['partial_r2']['categories'])} [{fmt(lo)}, {fmt(hi)}]")
    return lines


def _update_headline(u: dict[str, Any]) -> list[str]:
    rows = u["comparison"]["rows"]
    sig = [r for r in rows if r["effect"] in ("more", "less")]
    null = [r for r in rows if (r["a"], r["b"]) == ("shuffled_reflection", "shuffled_ordinary")]
    rep = sum(bool(r.get("reproduced_by_random_init")) for r in sig)
    ctrl = f", {rep} of them reproduced by the random-init model" if u.get("control") else ""
    lines = [f"implicit updates: {len(sig)} of {len(rows)} comparisons significant after Holm{ctrl}; "
             f"shuffled-label null significant in {sum(r in sig for r in null)} of {len(null)}"]
    pooled = [r for r in sig if r["layer"] == "pooled" and (r["a"], r["b"]) == ("reflection", "ordinary")]
    strong = sorted(pooled, key=lambda r: -abs(r["cliffs_delta"] or 0))[:2]
    for r in strong:
        tail = ("" if r.get("reproduced_by_random_init") is None else
                "; also in random-init" if r["reproduced_by_random_init"] else "; not in random-init")
        lines.append(f"  {r['metric']}: reflection tokens {r['effect']} than ordinary "
                     f"(Cliff's δ {fmt(r['cliffs_delta'], '.2f')}{tail})")
    return lines


def _sections(compare: dict[str, Any] | None, plots: list[Plot], scan: _Scan) -> list[Section]:
    by_part: dict[str, list[Block]] = {"lhat": [], "updates": [], "other": []}
    for p in plots:
        part = ("lhat" if p.name.startswith(("categories_", "lhat_")) else
                "updates" if p.name.startswith(("heatmap_", "steps_")) else "other")
        by_part[part].append(p)
    out = []
    if compare is not None and "table" in compare:
        rp = compare["repro"]
        blocks: list[Block] = [*trend_lines(compare["trend"])]
        if rp.get("median_final_score") is not None:
            blocks.append(f"RePro final score, median over {rp['n_traces']} traces: "
                          f"{fmt(rp['median_final_score'])} ({rp['formula']}).")
        meta = compare["table"]["meta"]
        blocks.append(lhat_comparison_table(
            compare["table"], caption=f"{meta['metric']} per trace: categories, controls and phrases"))
        out.append(Section("lhat", "L̂: the answer loss along the trajectory", blocks + by_part["lhat"]))
    if compare is not None and "updates" in compare:
        u = compare["updates"]
        ctrl = f"; random-init control {u['control']}" if u.get("control") else ""
        blocks = [f"{u['n_traces']} traces x {u['n_layers']} layers ({u['layers']}), metrics "
                  f"{', '.join(u['metrics'])}; query rows: {u['answer_rows']}{ctrl}.",
                  update_comparison_table(u["comparison"], caption="pooled over layers"),
                  Collapsed(f"every layer ({len(u['comparison']['rows'])} rows)",
                            update_comparison_table(u["comparison"], layers="all"))]
        out.append(Section("updates", "Implicit updates per token", blocks + by_part["updates"]))
    if compare is not None and "fit" in compare:
        f = compare["fit"]
        block: Block = (fit_table(f, caption="ΔL̂ per token regressed on the mechanistic features")
                        if f.get("fits") else f"skipped: {f.get('skipped')}")
        out.append(Section("fit", "ΔL̂ explained by the mechanism", [block]))
    if scan.sites:
        rows = [[n, s["dtype"], str(s["row_shape"]), str(s["layers"])] for n, s in scan.sites.items()]
        out.append(Section("sites", "Activations", [Table(["site", "dtype", "row shape", "layers"], rows,
                                                          note="read them with cache.open_cache")]))
    if by_part["other"]:
        out.append(Section("plots", "Other plots", by_part["other"]))
    return out


def _footer(scan: _Scan, cfg: ReportConfig) -> list[str]:
    ctrl = f" --control {cfg.control}" if cfg.control else ""
    source = (f"read from {cfg.compare_json}" if cfg.compare_json is not None else
              f"`python -m probes.run compare {scan.path}{ctrl} --n-boot {cfg.n_boot} --seed {cfg.seed} "
              "--json` gives the same numbers")
    return [f"Statistics: `compare` ({source}).",
            f"Per-token tables for pandas: `from cache.tables import token_table; token_table("
            f"{str(scan.path)!r})`.",
            f"Written by trajectory-probes {__version__} at "
            f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}."]


def build_report(path: Path, cfg: ReportConfig, *,
                 stages: Stages | None = None) -> tuple[Report, dict[str, Any]]:
    """The report of a cache, and facts for the summary line (`n_traces`, `n_plots`, ...).

    Raises:
        ProbesError: Unknown `trace_ids` or `colour_by`, a control that does not match, a bad
            `compare_json`.
        CacheError: The cache cannot be read.
    """
    stages = stages or Stages(total=0, desc=NAME, enabled=False)
    stages.step("reading the cache")
    scan = _scan(Path(path))
    stages.advance()
    view_ids = _pick_views(scan, cfg)
    stages.set_total(3 + len(view_ids))
    views, keys, note = _token_views(scan, view_ids, stages)
    default = _default_key(keys, cfg.colour_by)  # a bad --colour-by fails before the long step
    compare, plots = _compare(scan, cfg, stages)
    stages.advance()
    counts = {"n_traces": len(scan.ids), "model": scan.meta.get("model"),
              "tokens": sum(scan.tokens.values()), "reflection": scan.tokens.get("reflection", 0),
              "delimiter": scan.tokens.get("delimiter", 0),
              "with_reflection": scan.traces_with.get("reflection", 0)}
    headline = headline_lines(counts, compare)
    report = Report(
        title=f"trajectory-probes report: {scan.path.name}",
        subtitle=f"{scan.meta.get('model')} · {len(scan.ids)} traces · {scan.path}",
        identity=_identity(scan, cfg.control), headline=headline, views=views, keys=keys,
        default_key=default, sections=_sections(compare, plots, scan), footer=_footer(scan, cfg))
    facts = {"n_traces": len(scan.ids), "n_views": len(views), "n_plots": len(plots),
             "n_view_tokens": sum(v.n_trajectory for v in views), "headline": headline,
             "notes": [note] if note else []}
    return report, facts


def write_report(path: Path, out: Path | None, cfg: ReportConfig, *, progress: bool = False) -> ReportResult:
    """Build the report of `path` and write it to `out` (default: `report.html` / `report.md`
    next to the cache; replaced if present, written atomically).

    Returns:
        What was written.
    """
    t0 = time.perf_counter()
    path = Path(path)
    out = Path(out) if out is not None else path.parent / f"report.{cfg.format}"
    with Stages(total=3 + (len(cfg.trace_ids) or cfg.n_views), desc=NAME, enabled=progress) as stages:
        report, facts = build_report(path, cfg, stages=stages)
        stages.step(f"writing {out.name}")
        text = render_html(report) if cfg.format == "html" else render_markdown(report)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
        stages.advance()
    return ReportResult(out=out, format=cfg.format, bytes=out.stat().st_size,
                        n_traces=facts["n_traces"], n_views=facts["n_views"],
                        n_view_tokens=facts["n_view_tokens"], n_plots=facts["n_plots"],
                        seconds=time.perf_counter() - t0, headline=facts["headline"],
                        notes=facts["notes"])


HOVER_FOR_SCREENSHOT = ".view:not([hidden]) .t.c1"
"""The token the screenshot hovers (the first reflection token shown), so its card is in the picture."""


def screenshot(html_file: Path, png: Path, *, max_height: int = 1800, width: int = 1280) -> Path:
    """A PNG of the top `max_height` pixels of an HTML report in headless Chromium, with the mouse
    on the first reflection token shown (its hover card open).

    Raises:
        BrowserError: No Chromium, or it failed.
    """
    from probes.commands.browser import Page

    with Page(html_file, width=width, height=max_height) as page:
        page.hover_over(HOVER_FOR_SCREENSHOT)
        return page.screenshot(png, max_height=max_height)


# --------------------------------------------------------------------------------------------------
# The demo's last step


def report_demo(out_dir: str | os.PathLike[str], *, progress: bool = False) -> tuple[Path, list[str]]:
    """Write `out_dir/report.html` for the demo's caches and return it with a short summary.

    Uses `out_dir/run.h5`, `out_dir/random_init.h5` (if present) and, when the demo saved it and
    it is newer than both caches, its comparison `out_dir/compare.json` (else `compare` runs
    again, with the demo's `DEMO_N_BOOT`). The summary (at most 15 lines) takes the answer
    accuracy and timing from `out_dir/summary.json` when present.

    Returns:
        (the report path, the summary lines).
    """
    folder = Path(out_dir)
    run, control, saved = folder / "run.h5", folder / "random_init.h5", folder / "compare.json"
    control_path = control if control.is_file() else None
    compare_json = saved if (saved.is_file() and saved.stat().st_mtime >= max(
        p.stat().st_mtime for p in (run, control_path) if p is not None)) else None
    cfg = ReportConfig(control=control_path, n_boot=DEMO_N_BOOT, compare_json=compare_json)
    result = write_report(run, folder / "report.html", cfg, progress=progress)
    return result.out, demo_summary_lines(folder, result)


def demo_summary_lines(folder: Path, result: ReportResult) -> list[str]:
    """The demo's short summary: answer accuracy, the report's headline, files, where the report is."""
    summary: dict[str, Any] = {}
    if (folder / "summary.json").is_file():
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    lines = list(result.headline[:8])
    if "answer_accuracy" in summary:
        lines.insert(1, f"greedy answer accuracy {summary['answer_accuracy']:.3f} with the trajectory, "
                        f"{summary['answer_accuracy_no_trajectory']:.3f} without")
    files = [f"{p} ({human_size(p.stat().st_size)})" for p in
             (folder / "run.h5", folder / "random_init.h5") if p.is_file()]
    n_png = len(list((folder / "plots").glob("*.png"))) if (folder / "plots").is_dir() else 0
    extra = "".join(f", {name}" for name in ("summary.json", "compare.json") if (folder / name).is_file())
    extra += f", plots/ ({n_png} PNG)" if n_png else ""
    lines.append(f"wrote {', '.join(files)}{extra}")
    lines.append(f"report: {result.out} ({human_size(result.bytes)}) - open it in a browser")
    took = summary.get("seconds", 0.0) + result.seconds
    lines.append(f"took {took:.0f}s; every number: `python -m probes.run demo --out {folder} --verbose`")
    return lines[:15]


# --------------------------------------------------------------------------------------------------
# Command line


def add_parser(sub: Any) -> None:
    """Register `report` and its flags."""
    p = sub.add_parser(
        NAME, formatter_class=flags.HelpFormatter,
        help="one self-contained HTML report of a cache: identity, tables, plots, token heat maps",
        description=(
            "From the cache alone (no model): one HTML file that opens offline (plots embedded, no "
            "external scripts) with the run's identity (model, architecture, dtype, versions, "
            "lexicon, traces and tokens per category), the headline findings, token heat maps of a "
            "few traces (each trajectory token coloured by a per-token array such as dL-hat, rho, "
            "sigma or M7; hover for the token, its position and its values), and a section per "
            "analysis in the cache with the tables of `compare` (95% CIs, controls, random-init) "
            "and every plot it draws. --format md writes the same tables as Markdown."
        ),
    )
    p.add_argument("path", type=Path, help="the .h5 cache (from `cache`, `lhat`, `updates`)")
    p.add_argument("--control", type=Path, default=None,
                   help="a cache of the same traces from `updates --control random-init`")
    p.add_argument("--out", type=Path, default=None,
                   help="the report file (default: report.html or report.md next to the cache)")
    p.add_argument("--format", choices=FORMATS, default=FORMATS[0],
                   help="html: one self-contained page; md: its tables as Markdown")
    p.add_argument("--traces", type=flags.nonnegative_int, default=DEFAULT_VIEWS, metavar="N",
                   help="traces shown as token heat maps (those with a reflection first)")
    p.add_argument("--trace-id", action="append", default=[], metavar="ID",
                   help="show this trace as a heat map (repeatable; replaces --traces)")
    p.add_argument("--colour-by", "--color-by", dest="colour_by", default=None, metavar="ARRAY",
                   help="per-token array coloured when the page opens, e.g. lhat_delta, lhat_rho, "
                        "upd_m7 (mean over layers), upd_m7@2 (layer 2); default: lhat_delta")
    p.add_argument("--n-boot", type=flags.positive_int, default=2000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0, help="seed of controls and bootstrap")
    p.add_argument("--compare-json", type=Path, default=None, metavar="FILE",
                   help="a saved `compare --json` output of this cache (and --control): use its "
                        "numbers and plots instead of running the comparison again")
    p.add_argument("--screenshot", type=Path, default=None, metavar="PNG",
                   help="also save a PNG of the top of the page, rendered by headless Chromium")
    quiet_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`report` from parsed flags."""
    if args.screenshot is not None and args.format != "html":
        raise ProbesError("--screenshot renders the HTML report; drop --format md")
    cfg = ReportConfig(control=args.control, n_views=args.traces, trace_ids=tuple(args.trace_id),
                       colour_by=args.colour_by, n_boot=args.n_boot, seed=args.seed,
                       format=args.format, compare_json=args.compare_json)
    result = write_report(args.path, args.out, cfg, progress=progress_on(args.quiet))
    for note in result.notes:
        print(f"note: {note}")
    if args.screenshot is not None:
        shot = screenshot(result.out, args.screenshot)
        print(f"screenshot: {shot}")
    print(result.summary())
    return 0

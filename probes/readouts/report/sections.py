"""The parts of `report`'s page built from `compare`'s numbers: the comparison itself (run or read
from `--compare-json`), its plots, the identity tables, the headline, the sections and the footer.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from analyses.report_data import Block, Collapsed, Plot, Section, Table, fmt
from analyses.report_tables import fit_table, lhat_comparison_table, trend_lines, update_comparison_table
from probes import __version__
from probes.arrays import METHODS
from probes.errors import ProbesError
from probes.pipeline.loop import human_size
from probes.pipeline.progress import Stages
from probes.readouts.calibration import mde_text
from probes.readouts.compare import compare_cache, report_json
from probes.readouts.compare_updates import PLOT_DPI
from probes.readouts.configs import CompareConfig
from probes.readouts.report.scan import _Scan
from probes.readouts.report.stores import REPORT_ANALYSES, Found
from probes.safe_output import figure_png

if TYPE_CHECKING:
    from probes.readouts.configs import ReportConfig

_METRIC_NAMES = {"abs_delta": "|ΔL̂|", "delta": "ΔL̂", "rho": "ρ", "lam": "Δ log L̂",
                 "abs_lam": "|Δ log L̂|"}
"""How the headline names `compare --metric` values."""


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
    images: dict[str, bytes] = {}

    def keep(fig: Any, name: str) -> str:  # the page embeds the PNGs: none is written to disk
        images[name] = figure_png(fig, dpi=PLOT_DPI)
        return name

    with stages.working(f"comparing {len(scan.ids)} traces (compare)"):
        raw = compare_cache(scan.path, CompareConfig(n_boot=cfg.n_boot, seed=cfg.seed,
                                                     plot_save=keep, control=cfg.control))
    report = report_json(raw)
    return report, [Plot(_plot_title(Path(name).stem), images[name], name)
                    for name in report.get("plots", [])]


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
            stored is not None and control is not None
            and Path(stored).resolve() != Path(control).resolve()):
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


def _stored_line(cfg: dict[str, Any]) -> str:
    """What activations the cache holds, in words ("no activations stored" when none)."""
    sites = list(cfg.get("sites") or {})
    if not sites:
        return "no activations stored"
    positions = cfg.get("positions")
    dtype = cfg.get("storage_dtype")
    return (f"sites {', '.join(sites)}" + (f" on {positions} tokens" if positions else "")
            + (f", {dtype}" if dtype else ""))


def _stores_table(found: Found) -> Table:
    rows = []
    for s in found.stores:
        try:
            name = str(s.path.relative_to(found.root))
        except ValueError:
            name = str(s.path)
        held = ", ".join(a for a in (*REPORT_ANALYSES, "sites") if a in s.analyses) or "labels only"
        rows.append([name, s.meta.get("model"), "random-init control" if s.control else "trained",
                     held, fmt(s.n_traces), human_size(s.bytes)])
    return Table(["store", "model", "kind", "holds", "traces", "size"], rows,
                 caption="stores read", note="size = index file + segments; "
                 + (f"unreadable: {'; '.join(found.problems)}" if found.problems else "all readable"))


def _identity(scan: _Scan, control: Path | None, found: Found | None = None) -> list[Table]:
    m, arch = scan.meta, scan.meta.get("architecture", {})
    cfg, info = m.get("config", {}), m.get("info", {})
    lexicon_files = info.get("lexicon_files") or ["built-in"]
    run: list[list[Any]] = [
        ["cache", f"{scan.path} ({human_size(scan.file_bytes)})"],
        ["model", m.get("model")],
        ["architecture", f"{arch.get('family')}, {arch.get('n_layers')} layers, d_model "
                         f"{arch.get('d_model')}, {arch.get('n_heads')} heads ({arch.get('n_kv_heads')} KV), "
                         f"d_mlp {arch.get('d_mlp')}, {arch.get('norm')}, {arch.get('positional')}, "
                         f"vocab {arch.get('vocab_size')}, context {arch.get('n_ctx')}"],
        ["model dtype", m.get("model_dtype")],
        ["stored", _stored_line(cfg)],
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
    tables = [Table(["", ""], run, caption="run"),
              Table(["category", "tokens", "traces with it"], counts, caption="tokens per category"),
              Table(["analysis", "traces"], held, caption="what the cache holds")]
    if found is not None and (len(found.stores) > 1 or found.root.is_dir()):
        tables.append(_stores_table(found))
    return tables


def _finding(row: dict[str, Any], n_run: int, what: str) -> str:
    """One headline finding: n, the matched baseline, the random-init baseline (where a control was
    compared), the calibrated p (sign-flip permutation, `analyses.inference.signflip_p`) and its
    Holm adjustment, the MDE at 80% power for a run of `n_run` traces; below the floor on
    inference "not testable at this n" and no CI or p."""

    head = (f"{what} ({row['n_traces']} traces): {fmt(row['median_a'])} vs {fmt(row['median_b'])} "
            f"({row['b']}, the matched baseline)" if row["b"].startswith("matched_") else
            f"{what} ({row['n_traces']} traces): {fmt(row['median_a'])} vs {fmt(row['median_b'])} "
            f"({row['b']})")
    if row.get("testable") is False:
        return f"{head}: not testable at this n ({row.get('note')})"
    lo, hi = row["ci_median_diff"]
    ctrl = row.get("control")
    base = ("not measured" if not ctrl else
            f"difference {fmt(ctrl.get('median_diff'))}, {row.get('control_effect')}")
    return (f"{head}: difference {fmt(row['median_diff'])} [{fmt(lo)}, {fmt(hi)}], p "
            f"{fmt(row.get('p'), '.2g')} (sign-flip permutation), Holm p {fmt(row['p_holm'], '.2g')}"
            f"; random-init baseline: {base}; {mde_text(n_run)}")


def headline_lines(scan_counts: dict[str, Any], compare: dict[str, Any] | None) -> list[str]:
    """The report's summary lines: size of the run, L̂ trend, reflections vs ordinary tokens,
    the update comparisons and the behaviour fit (those present). Each comparison finding carries
    n, its matched and random-init baselines, the calibrated p and the MDE (`_finding`)."""
    lines = [f"{scan_counts['n_traces']} traces of {scan_counts['model']}: "
             f"{scan_counts['tokens']} tokens, {scan_counts['reflection']} reflection and "
             f"{scan_counts['delimiter']} delimiter tokens ({scan_counts['with_reflection']} traces "
             "with a reflection)"]
    if compare is None:
        return [*lines, "no L̂ curves or update arrays yet: run `lhat` and/or `updates` on it"]
    n_run = int(compare.get("n_traces") or scan_counts["n_traces"])
    if "trend" in compare:
        t = compare["trend"]
        lines.append(f"L̂ falls along the trajectory in {fmt(t.get('share_falling'), '.0%')} of traces "
                     f"(median change {fmt(t.get('median_change'))} nats)")
        row = next((r for r in compare["table"]["rows"]
                    if (r["a"], r["b"]) in (("reflection", "matched_to_reflection"),
                                            ("reflection", "ordinary"))), None)
        if row is not None:
            meta = compare["table"]["meta"]
            metric = _METRIC_NAMES.get(meta.get("metric"), meta.get("metric"))
            lines.append(_finding(row, n_run, f"{row['a']} vs {row['b']} tokens, per-trace "
                                              f"{meta.get('statistic')} {metric}")
                         .replace("; random-init baseline: not measured",
                                  "; random-init baseline: not measured for L̂"))
    if "updates" in compare:
        lines += _update_headline(compare["updates"], n_run)
    fits = (compare.get("fit") or {}).get("fits", {})
    if "delta" in fits:
        f = fits["delta"]
        lo, hi = f["ci"]["categories"]
        lines.append(f"ΔL̂ per token explained out of fold: R² {fmt(f['r2']['full'])}; partial R² of "
                     f"the categories {fmt(f['partial_r2']['categories'])} [{fmt(lo)}, {fmt(hi)}]")
    return lines


def _update_headline(u: dict[str, Any], n_run: int) -> list[str]:
    rows = u["comparison"]["rows"]
    sig = [r for r in rows if r["effect"] in ("more", "less")]
    null = [r for r in rows if (r["a"], r["b"]) == ("shuffled_reflection", "shuffled_ordinary")]
    rep = sum(bool(r.get("reproduced_by_random_init")) for r in sig)
    ctrl = f", {rep} of them reproduced by the random-init model" if u.get("control") else ""
    lines = [f"implicit updates: {len(sig)} of {len(rows)} comparisons significant after Holm{ctrl}; "
             f"shuffled-label null significant in {sum(r in sig for r in null)} of {len(null)}"]
    heads = [r for r in rows if r["layer"] == "pooled" and (r["a"], r["b"]) in (
        ("reflection", "matched_to_reflection"), ("reflection", "ordinary"))]
    pooled = [r for r in heads if r in sig]
    strong = sorted(pooled, key=lambda r: -abs(r["cliffs_delta"] or 0))[:2]
    for r in strong:
        lines.append(f"  {r['metric']}: reflection tokens {r['effect']} than ordinary; "
                     + _finding(r, n_run, f"{r['metric']} pooled, {r['a']} vs {r['b']}"))
    untestable = sorted({r["metric"] for r in heads if r.get("testable") is False})
    if untestable:
        lines.append(f"  not testable at this n: {', '.join(untestable)} (reflection vs "
                     f"{heads[0]['b']}, pooled: below the floor on inference)")
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
        out.append(Section("lhat", "L̂: the answer loss along the trajectory", blocks + by_part["lhat"],
                           links=[(f"method: {METHODS}#m8", f"{METHODS}#m8")]))
    if compare is not None and "updates" in compare:
        u = compare["updates"]
        ctrl = f"; random-init control {u['control']}" if u.get("control") else ""
        blocks = [f"{u['n_traces']} traces x {u['n_layers']} layers ({u['layers']}), metrics "
                  f"{', '.join(u['metrics'])}; query rows: {u['answer_rows']}{ctrl}.",
                  update_comparison_table(u["comparison"], caption="pooled over layers"),
                  Collapsed(f"every layer ({len(u['comparison']['rows'])} rows)",
                            update_comparison_table(u["comparison"], layers="all"))]
        out.append(Section("updates", "Implicit updates per token", blocks + by_part["updates"],
                           links=[(f"method: {METHODS}#{a}", f"{METHODS}#{a}")
                                  for a in ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "controls")]))
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

"""`python -m probes.run anchors`: sentence-level anchors of every trace, written into an HDF5 cache.

Per trace (through the write loop, `probes.pipeline.loop.write_traces`): the chunks and their
labels (`probes.traces.chunks`; always), then the analyses asked for with `--analyses`:
- `receiver`: vertical scores of every layer × head and the per-head kurtosis
  (`probes.measures.anchors.receivers.chunk_attention`);
- `suppression`: the chunk × chunk KL matrix and the answer-NLL change of masking each chunk's
  keys (`probes.measures.anchors.receivers.suppression`);
- `resampling`: K continuations from every chunk prefix with the model itself, graded, and the
  resampling / counterfactual importances (`probes.measures.anchors.resampling`), with forced-answer
  importance from L̂ at the chunk boundaries (`probes.measures.lhat.fast.lhat_fast`).

Resumable: a trace that has the last array of the asked analyses is skipped, and a trace that has
some of them gets only the missing ones (e.g. `--analyses resampling --resume` on a cache that has
the white-box arrays). After the loop the whole cache is summarised (`summarize_anchors`): the
receiver heads (top-k by kurtosis averaged over traces), and per chunk category the mean of every
chunk measure.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from analyses import anchor_plots
from cache import open_cache
from hooks.model import LoadedModel
from probes.errors import ProbesError
from probes.measures.anchors import receivers as anc
from probes.measures.anchors import resampling as rs
from probes.measures.lhat.fast import lhat_fast
from probes.models.spec import ModelSpec
from probes.pipeline.configs import (
    ANALYSES,
    AnchorsConfig,
    TraceSource,
    trace_source,
)
from probes.pipeline.loop import Log, Plan, TraceOutput, WriteJob, WriteResult, loader, write_traces
from probes.pipeline.progress import Stages
from probes.safe_output import save_figure
from probes.traces.categories import CATEGORY_NAMES, categorize, load_lexicon
from probes.traces.chunks import chunk_labels, token_chunks

NAME = "anchors"


ARRAYS: dict[str, tuple[str, ...]] = {
    "chunks": ("chunk_spans", "chunk_category"),
    "receiver": ("anc_vertical", "anc_kurtosis"),
    "suppression": ("anc_supp_kl", "anc_supp_dl"),
    "resampling": ("anc_forced", "anc_rs_acc", "anc_rs_importance", "anc_rs_ci_acc",
                   "anc_rs_ci_kl", "anc_rs_n_dissimilar"),
}
"""The stored arrays of each analysis (declared in `probes.arrays.ANCHORS`); the last of each
marks it done."""


@dataclass
class AnchorsRunResult(WriteResult):
    """An `anchors` run: the write loop's counts plus the anchors figures.

    Attributes:
        analyses: The analyses run, in order.
        n_chunks: Chunks of the traces computed in this run.
        supp_forwards, supp_rows: Suppression forward calls, and sequences they ran (1 + C per
            trace).
        supp_cost_ratio: Mean suppression wall time in units of one unmasked forward per chunk.
        seconds_receiver, seconds_suppression, seconds_resampling: Time in each analysis.
        n_samples, n_forced: Resampled continuations, and those with a forced answer.
        cache_summary: `summarize_anchors` of the whole cache after the run.
    """

    analyses: tuple[str, ...] = ()
    n_chunks: int = 0
    supp_forwards: int = 0
    supp_rows: int = 0
    supp_cost_ratio: float | None = None
    seconds_receiver: float = 0.0
    seconds_suppression: float = 0.0
    seconds_resampling: float = 0.0
    n_samples: int = 0
    n_forced: int = 0
    cache_summary: dict[str, Any] = field(default_factory=dict)


def _embedder(folder: str):
    """Mean-pooled last hidden states of a local transformers encoder, as `embed(texts)`."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()

    @torch.inference_mode()
    def embed(texts):
        enc = tok(list(texts), padding=True, truncation=True, return_tensors="pt")
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"][..., None].to(h.dtype)
        return ((h * m).sum(1) / m.sum(1).clamp(min=1)).numpy()

    return embed


def anchors_traces(model: ModelSpec | LoadedModel | str, traces: TraceSource | str | PathLike[str],
                   out: Path, cfg: AnchorsConfig, *, resume: bool = False,
                   device: str | None = None, dtype: str | None = None, progress: bool = True,
                   log: Log | None = None) -> AnchorsRunResult:
    """Compute and store the anchors arrays of every trace, then summarise the cache (`traces`:
    a `TraceSource` or its path, as for every runner: `probes.pipeline.configs.trace_source`).

    Raises:
        ProbesError, CacheError: Bad settings or input, or a cache made with other settings.
    """
    cfg.check()
    source = trace_source(traces, cfg)
    order = [a for a in ANALYSES if a in cfg.analyses]
    have: dict[str, frozenset[str]] = {}
    attrs = {f"anchors_{a}": cfg.settings(a) for a in order}

    def check_stored(reader: Any) -> None:
        for tr in reader:
            have[tr.id] = frozenset(tr.names())
            for key, value in attrs.items():
                prior = tr.attrs.get(key)
                if prior is not None and prior != value:
                    raise ProbesError(
                        f"{out}: trace {tr.id!r} has {key.removeprefix('anchors_')} arrays made "
                        f"with other settings ({prior}; this run: {value}); use the same "
                        f"settings or another --out")

    job = WriteJob(command=NAME, out=Path(out), resume=resume, done_key=ARRAYS[order[-1]][-1],
                   check_stored=check_stored, progress=progress, log=log)
    result = AnchorsRunResult(analyses=tuple(order))
    lexicon = load_lexicon(extra=source.lexicon)
    embed = _embedder(cfg.embedding_model) if cfg.embedding_model else None
    ratios: list[float] = []
    n_planned = [0]
    samples_bar = Stages(total=0, desc="anchors resampling", unit="sample",
                         enabled=progress and "resampling" in order)

    def plan(loaded: LoadedModel) -> Plan:
        def compute(tt) -> TraceOutput | str:
            chunks = token_chunks(tt)
            labels = chunk_labels(tt, chunks, categorize(tt, lexicon))
            arrays: dict[str, np.ndarray] = {"chunk_spans": chunks.spans,
                                             "chunk_category": labels}
            stored = have.get(tt.trace.id, frozenset())
            todo = [a for a in order if ARRAYS[a][-1] not in stored]
            t0 = tt.spans["trajectory"][0]
            result.n_chunks += len(chunks)
            if "receiver" in todo:
                clock = time.perf_counter()
                pattern = anc.chunk_attention(loaded, tt.ids, chunks.spans + t0)
                vertical = anc.vertical_scores(pattern, cfg.proximity_ignore)
                arrays["anc_vertical"] = vertical.astype(np.float32)
                arrays["anc_kurtosis"] = anc.head_kurtosis(vertical).astype(np.float32)
                result.seconds_receiver += time.perf_counter() - clock
            if "suppression" in todo:
                sup = anc.suppression(loaded, tt, chunks.spans, batch_size=cfg.supp_batch,
                                      temperature=cfg.supp_temperature)
                arrays["anc_supp_kl"], arrays["anc_supp_dl"] = sup.kl, sup.dl
                result.supp_forwards += sup.n_forwards
                result.supp_rows += sup.n_rows
                result.seconds_suppression += sup.seconds
                ratios.append(sup.cost_ratio)
            if "resampling" in todo:
                n_planned[0] += (len(chunks) + 1) * cfg.resample.k
                samples_bar.set_total(n_planned[0])
                arrays.update(_resampling_arrays(loaded, tt, chunks, cfg, embed, result,
                                                 samples_bar))
            done = {f"anchors_{a}": cfg.settings(a) for a in todo}
            return TraceOutput(arrays=arrays, attrs={"anchors_n_chunks": len(chunks), **done})

        return Plan(compute)

    with samples_bar:
        write_traces(job, source, load=loader(model, device=device, dtype=dtype), plan=plan,
                     result=result)
    result.supp_cost_ratio = float(np.mean(ratios)) if ratios else None
    result.cache_summary = summarize_anchors(out, top_heads=cfg.top_heads)
    if cfg.plots:
        result.cache_summary["plots"] = draw_plots(out, result.cache_summary, Path(cfg.plots))
    return result


def draw_plots(path: str | Path, summary: dict[str, Any], folder: Path) -> list[str]:
    """Receiver-head kurtosis (layer × head), and the suppression matrix and chunk measures of the
    first trace that has them, as PNGs in `folder`."""

    out = []
    if summary.get("mean_kurtosis"):
        heads = np.asarray([h[:2] for h in summary.get("receiver_heads", [])], dtype=int)
        out.append(save_figure(anchor_plots.kurtosis_figure(np.asarray(summary["mean_kurtosis"]),
                                                            heads), folder / "receiver_kurtosis.png"))
    with open_cache(path) as reader:
        for tr in reader:
            names = set(tr.names())
            if "chunk_category" not in names:
                continue
            cats = np.asarray(tr["chunk_category"][...])
            if "anc_supp_kl" in names:
                out.append(save_figure(anchor_plots.suppression_figure(
                    np.asarray(tr["anc_supp_kl"][...]), cats,
                    title=f"attention suppression, trace {tr.id}"), folder / "suppression_matrix.png"))
            measures = {k: np.asarray(tr[k][...]) for k in ("anc_supp_dl", "anc_forced",
                                                            "anc_rs_importance", "anc_rs_ci_acc")
                        if k in names}
            if measures:
                out.append(save_figure(anchor_plots.chunk_importance_figure(
                    measures, cats, title=f"chunk importance, trace {tr.id}"),
                    folder / "chunk_importance.png"))
            break
    return [str(p) for p in out]


def _resampling_arrays(loaded, tt, chunks, cfg: AnchorsConfig, embed, result: AnchorsRunResult,
                       bar: Stages) -> dict[str, np.ndarray]:
    clock = time.perf_counter()
    samples = rs.resample(loaded, tt, chunks.spans, cfg.resample,
                          on_batch=lambda n: bar.advance(n))
    imp = rs.importance(samples, chunks.texts, similarity=cfg.similarity, embed=embed,
                        threshold=cfg.threshold, prob_true=cfg.prob_true)
    bounds = np.r_[chunks.spans[:, 0], chunks.spans[-1, 1]].astype(np.int64)
    lhat = lhat_fast(loaded, tt, ts=bounds).lhat.astype(np.float64)
    result.n_samples += len(samples)
    result.n_forced += sum(s.forced for s in samples)
    result.seconds_resampling += time.perf_counter() - clock
    return {"anc_forced": np.diff(lhat).astype(np.float32), "anc_rs_acc": imp.acc,
            "anc_rs_importance": imp.resampling, "anc_rs_ci_acc": imp.ci_acc,
            "anc_rs_ci_kl": imp.ci_kl, "anc_rs_n_dissimilar": imp.n_dissimilar}


CHUNK_MEASURES: tuple[tuple[str, str], ...] = (
    ("receiver_score", "receiver score (mean vertical score over the receiver heads)"),
    ("anc_supp_dl", "answer-NLL change when the chunk is suppressed"),
    ("anc_forced", "forced-answer importance (chunk's L-hat change)"),
    ("anc_rs_importance", "resampling importance"),
    ("anc_rs_ci_acc", "counterfactual importance (accuracy)"),
    ("anc_rs_ci_kl", "counterfactual importance (KL)"),
)
"""Per-chunk measures the summary compares across chunk categories."""


def summarize_anchors(path: str | Path, *, top_heads: int = anc.TOP_K_HEADS) -> dict[str, Any]:
    """Receiver heads and per-category chunk measures of an anchors cache (JSON-able)."""

    per_trace: list[dict[str, np.ndarray]] = []
    with open_cache(path) as reader:
        for tr in reader:
            names = set(tr.names())
            if "chunk_spans" not in names:
                continue
            per_trace.append({n: np.asarray(tr[n][...]) for n in names
                              if n.startswith(("chunk_", "anc_"))} | {"id": tr.id})
    out: dict[str, Any] = {"n_traces": len(per_trace),
                           "n_chunks": int(sum(len(t["chunk_spans"]) for t in per_trace))}
    kurt = [t["anc_kurtosis"] for t in per_trace if "anc_kurtosis" in t]
    if kurt:
        heads, mean = anc.receiver_heads(kurt, top_heads)
        out["receiver_heads"] = [[int(layer), int(h), float(mean[layer, h])] for layer, h in heads]
        out["mean_kurtosis"] = [[None if x != x else float(x) for x in row] for row in mean]
        out["kurtosis_by_layer"] = [float(x) for x in np.nanmean(mean, axis=1)]
        for t in per_trace:
            if "anc_vertical" in t:
                t["receiver_score"] = anc.receiver_scores(t["anc_vertical"], heads)
    rows = {}
    for key, meaning in CHUNK_MEASURES:
        vals = [(t[key], t["chunk_category"]) for t in per_trace if key in t]
        if not vals:
            continue
        x = np.concatenate([v for v, _ in vals]).astype(np.float64)
        cat = np.concatenate([c for _, c in vals])
        row = {"meaning": meaning}
        for code in np.unique(cat):
            sel = x[cat == code]
            sel = sel[~np.isnan(sel)]
            row[CATEGORY_NAMES[int(code)]] = {"n": int(sel.size),
                                              "mean": float(sel.mean()) if sel.size else None}
        rows[key] = row
    out["by_category"] = rows
    return out

"""`python -m probes.run effects`: causal edits of single tokens' implicit updates (V7) and behaviour
directions, into an HDF5 cache (docs/methods.md#effects, #directions).

Per trace (through the one write loop, `probes.pipeline.loop.write_traces`; resumable, done =
`eff_dl_mlp` present):
* (layer ℓ, token t) pairs are sampled, `--pairs-per-category` per category (reflection, delimiter,
  ordinary; seeded per trace id), and for each the two real edits of `probes.measures.effects.edits` are
  run to the answer loss, batched `--batch-size` edited copies per forward: the attention knockout
  of key t at the answer rows in layer ℓ (`eff_dl_attn`, predicted by M7: `eff_pred_m7`) and the
  removal of t's rank-1 MLP step from W_gate/W_up of layer ℓ (`eff_dl_mlp`, predicted by M6:
  `eff_pred_m6`).
* `dir_proj` / `dir_cos` [C, L, T] (C = reflection, delimiter): each token's projection on the
  behaviour direction and the cosine of its M4 residual patch δ with it.

The directions themselves are one result of the whole traces file, not of a trace: a first pass over
the traces (`probes.measures.effects.directions`) computes them before the loop, and they are written, with
the probe accuracies, to `<out>.directions.npz` / the run summary `<out>.effects.json` (a cache
holds per-trace groups only). They are fixed at the first run: every trace's `eff_directions`
attribute is the digest of the directions its `dir_*` arrays use, and `--resume` reuses the file's
directions (checked against that digest; refused in one line when it is missing or differs) rather
than recomputing them, so a resumed run with a larger `--limit` projects on the same directions.

After the loop the command reads every trace's `eff_*` arrays back from the cache
(`probes.readouts.effects`) and prints V7 (real
ΔL vs the first-order predictions: Pearson, Spearman, median relative error, pooled and per
category) and the headline table (per category, the mean real ΔL of removing one token's update,
95% bootstrap CI over traces), next to a second cache's (`--versus`, e.g. a `--control random-init`
run) when given; `--plots DIR` draws predicted vs real ΔL.
"""

from __future__ import annotations

import hashlib
import io
import json
import zlib
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from analyses.token_sets import CATEGORY_CODES, CATEGORY_NAMES
from hooks.model import LoadedModel
from hooks.weights import llama_layers
from probes import arrays
from probes.errors import ProbesError
from probes.measures.effects.directions import (
    DIRECTION_CATEGORIES,
    DirectionAccumulator,
    DirectionsError,
    cosines,
    loo_residual,
    probe_accuracy,
    projections,
    trajectory_residuals,
)
from probes.measures.effects.edits import EffectsError, causal_effects, sample_pairs
from probes.measures.updates.alignment import answer_alignment
from probes.measures.updates.shared_pass import check_supported
from probes.models.controls import random_init_model
from probes.models.spec import ModelSpec
from probes.pipeline.configs import (
    EffectsConfig,
    TraceSource,
    trace_source,
)
from probes.pipeline.loop import (
    Log,
    Plan,
    TraceOutput,
    WriteJob,
    WriteResult,
    loader,
    same_settings,
    write_traces,
)
from probes.safe_output import write_file
from probes.traces.categories import categorize, load_lexicon
from probes.traces.tokenize import tokenize_traces

NAME = "effects"


EFFECT_ARRAYS = arrays.names(arrays.EFFECTS)


DONE_KEY = EFFECT_ARRAYS[-1]


DIRECTIONS_ATTR = "eff_directions"
"""Trace attribute: `directions_digest` of the behaviour directions its `dir_*` arrays use."""


_INFO_KEY = "__info__"
"""Entry of `<out>.directions.npz` holding the directions' run info (JSON), not a direction."""


@dataclass
class EffectsRunResult(WriteResult):
    """The write loop's counts plus the run-level results (directions, probes)."""

    control: str = "none"
    directions: dict[str, Any] = field(default_factory=dict)


def _rng(seed: int, trace_id: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(trace_id.encode())])


def _trajectory_names(tt, lexicon) -> np.ndarray:
    a, b = tt.spans["trajectory"]
    codes = categorize(tt, lexicon).category[a:b]
    return np.array([CATEGORY_NAMES[int(c)] for c in codes], dtype=object)


def _directions_pass(loaded: LoadedModel, tokenized, lexicon, seed: int, log: Log
                     ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Pass 1: the difference-of-means directions and the probe accuracies over all traces."""

    acc = DirectionAccumulator()
    feats: dict[str, list[np.ndarray]] = {c: [] for c in DIRECTION_CATEGORIES}
    labels: dict[str, list[np.ndarray]] = {c: [] for c in DIRECTION_CATEGORIES}
    for tt in tokenized:
        a, b = tt.spans["trajectory"]
        if b <= a:
            continue
        resid = trajectory_residuals(loaded, tt.ids, (a, b))
        names = _trajectory_names(tt, lexicon)
        acc.add(resid, names)
        rng = _rng(seed, tt.trace.id)
        for c in DIRECTION_CATEGORIES:
            pos = np.flatnonzero(names == c)
            neg = np.flatnonzero(names == "ordinary")
            neg = rng.choice(neg, min(len(neg), max(len(pos), 8)), replace=False)
            idx = np.concatenate([pos, neg]).astype(int)
            feats[c].append(resid[:, idx])
            labels[c].append((np.arange(len(idx)) < len(pos)).astype(int))
    dirs = acc.directions()
    info: dict[str, Any] = {"n_traces": acc.n_traces, "n_occurrences": dict(acc.counts),
                            "window": acc.window, "probe": {}}
    for c in DIRECTION_CATEGORIES:
        try:
            info["probe"][c] = probe_accuracy(feats[c], labels[c], seed=seed)
        except DirectionsError as e:
            info["probe"][c] = {"error": str(e)}
            log(f"effects: no {c} probe: {e}")
    return dirs, info


def effects_traces(model: ModelSpec | LoadedModel | str, traces: TraceSource | str | PathLike[str],
                   out: Path, cfg: EffectsConfig, *, resume: bool = False,
                   device: str | None = None, dtype: str | None = None, progress: bool = True,
                   log: Log | None = None) -> EffectsRunResult:
    """Run the causal edits and the direction measures of every trace into `out` (`traces`: a
    `TraceSource` or its path, as for every runner: `probes.pipeline.configs.trace_source`).

    Returns:
        Counts, timing and the run-level direction results (also written next to `out`).

    Raises:
        ProbesError, CacheError: Bad input, an unsupported model, a cache made with another model
            or other effects settings.
    """

    source = trace_source(traces, cfg)
    out = Path(out)
    say = log if log is not None else (lambda _m: None)
    own = cfg.own()
    settings = same_settings(out, DONE_KEY, own, "effects arrays", ProbesError)
    fixed: list[tuple[dict[str, np.ndarray], dict[str, Any]]] = []

    def check_stored(reader: Any) -> None:
        """The stored settings, and the directions the stored effects arrays were made with."""
        settings(reader)
        for tr in reader:
            if DONE_KEY in tr.names():
                fixed.append(_stored_directions(out, tr.attrs.get(DIRECTIONS_ATTR), say))
                return

    job = WriteJob(command=NAME, out=out, resume=resume, done_key=DONE_KEY,
                   check_stored=check_stored, progress=progress, log=log)
    result = EffectsRunResult(control=cfg.control)

    def load() -> LoadedModel:
        loaded = loader(model, device=device, dtype=dtype)()
        check_supported(loaded)
        return (random_init_model(loaded, cfg.control_seed) if cfg.control == "random-init"
                else loaded)

    def plan(loaded: LoadedModel) -> Plan:
        lexicon = load_lexicon(extra=source.lexicon)
        traces = source.read().traces
        traces = traces[:source.limit] if source.limit is not None else traces
        tokenized, _ = tokenize_traces(traces, loaded.tokenizer, prompt_format=source.prompt_format,
                                       scaffold=source.scaffold, max_tokens=loaded.arch.n_ctx)
        if fixed:
            dirs, info = fixed[0]
            say(f"effects: the behaviour directions of the first run, from "
                f"{directions_path(out)} (not recomputed from these {len(tokenized)} traces)")
        else:
            say(f"effects: behaviour directions from {len(tokenized)} traces")
            dirs, info = _directions_pass(loaded, tokenized, lexicon, cfg.seed, say)
            dirs = {c: np.asarray(v, np.float32) for c, v in dirs.items()}  # as stored
        digest = directions_digest(dirs)
        result.directions = {"categories": sorted(dirs), **info}
        w_o = [v.o_proj.weight for v in _layer_views(loaded)]
        unsaved = [not fixed]

        def compute(tt) -> TraceOutput | str:
            if unsaved[0]:  # under the writer lock: a second run on this --out never gets here
                _save_directions(out, dirs, info)
                unsaved[0] = False
            a, b = tt.spans["trajectory"]
            answer = tt.spans["answer"]
            if b <= a or answer[1] <= answer[0]:
                return "no trajectory or no answer token: nothing to measure"
            names = _trajectory_names(tt, lexicon)
            codes = np.array([CATEGORY_CODES[n] for n in names], dtype=np.uint8)
            pairs = sample_pairs(codes, loaded.arch.n_layers, cfg.pairs_per_category,
                                 _rng(cfg.seed, tt.trace.id), CATEGORY_CODES)
            al = answer_alignment(loaded, tt.ids, (a, b), answer, keep_factors=True, m6_rows=[0])
            eff = causal_effects(loaded, tt.ids, (a, b), answer, pairs, scale=cfg.scale,
                                 batch_size=cfg.batch_size, al=al)
            resid = trajectory_residuals(loaded, tt.ids, (a, b))
            L, T = resid.shape[:2]
            proj = np.full((len(DIRECTION_CATEGORIES), L, T), np.nan)
            cos = np.full_like(proj, np.nan)
            deltas = [loo_residual(al.factors[l]["dz"][0], w_o[l]) for l in range(L)]
            for k, c in enumerate(DIRECTION_CATEGORIES):
                if c in dirs:
                    proj[k] = projections(resid, dirs[c])
                    cos[k] = np.stack([cosines(deltas[l], dirs[c][l]) for l in range(L)])
            f32 = lambda x: np.ascontiguousarray(x, dtype=np.float32)  # noqa: E731
            stored = {"eff_pairs": eff.pairs.astype(np.int32), "eff_pred_m7": f32(eff.pred_m7),
                      "eff_pred_m6": f32(eff.pred_m6), "dir_proj": f32(proj), "dir_cos": f32(cos),
                      "eff_dl_attn": f32(eff.dl_attn), "eff_dl_mlp": f32(eff.dl_mlp)}
            return TraceOutput(arrays={k: stored[k] for k in EFFECT_ARRAYS},
                               attrs={"eff_loss": float(eff.loss), "eff_n_pairs": len(pairs),
                                      **own, DIRECTIONS_ATTR: digest},
                               n_tokens=int(tt.n_tokens) * (2 * len(pairs) + 3))

        return Plan(compute, info={"effects_directions": json.dumps(result.directions)})

    write_traces(job, source, load=load, plan=plan, result=result)
    return result


def _layer_views(loaded: LoadedModel):
    return llama_layers(loaded, what="effects", error=EffectsError)


def directions_path(out: Path) -> Path:
    """Where the run's directions go: `<out>.directions.npz`."""
    return Path(str(out) + ".directions.npz")


def summary_path(out: Path) -> Path:
    """Where the run summary goes: `<out>.effects.json`."""
    return Path(str(out) + ".effects.json")


def directions_digest(dirs: dict[str, np.ndarray]) -> str:
    """sha256 (hex) of the directions as stored (category names, shapes, float32 bytes)."""
    h = hashlib.sha256()
    for c in sorted(dirs):
        a = np.ascontiguousarray(dirs[c], dtype="<f4")
        h.update(f"{c}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _save_directions(out: Path, dirs: dict[str, np.ndarray], info: dict[str, Any]) -> None:
    """Write `<out>.directions.npz` (one float32 [L, d] per category, the run info) atomically."""
    buf = io.BytesIO()
    np.savez(buf, **{c: np.asarray(v, np.float32) for c, v in dirs.items()},
             **{_INFO_KEY: np.array(json.dumps(info, default=str))})
    write_file(directions_path(out), buf.getvalue())


def _stored_directions(out: Path, digest: Any, say: Log
                       ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The directions the stored effects arrays of `out` use (`<out>.directions.npz`), checked
    against the `digest` their traces record (None: written before it was recorded).

    Raises:
        ProbesError: The file is missing, unreadable or holds other directions.
    """
    path = directions_path(out)
    fix = (f"restore {path.name} of the run that wrote {out.name} (the directions are fixed at "
           f"the first run), or write to another --out")
    try:
        with np.load(path, allow_pickle=False) as z:
            dirs = {k: np.asarray(z[k]) for k in z.files if k != _INFO_KEY}
            info = json.loads(str(z[_INFO_KEY])) if _INFO_KEY in z.files else {}
    except FileNotFoundError:
        raise ProbesError(f"{out} holds effects arrays projected on behaviour directions, but "
                          f"{path} is missing; {fix}") from None
    except (OSError, ValueError) as exc:
        raise ProbesError(f"cannot read {path} ({exc}); {fix}") from None
    if digest is None:
        say(f"{out}: its effects arrays do not record their behaviour directions (written before "
            f"they did): {path} is reused as it is, unchecked")
    elif directions_digest(dirs) != digest:
        raise ProbesError(f"{path} holds behaviour directions {directions_digest(dirs)[:16]}, but "
                          f"the effects arrays of {out} were projected on {str(digest)[:16]}; "
                          f"{fix}")
    return dirs, info

"""`python -m probes.run fit`: the fitted linear maps (M12, docs/methods.md#m12) on a set of traces.

Needs the model (the fitted vectors are d-dimensional per token and layer, not stored in caches):
* (a) pseudo-gradient map (`probes.measures.fits.pseudo_gradient.fit_pseudo_gradient`): per layer,
  the exact leave-one-out change of the answer row's attention output caused by each trajectory
  token, regressed on the token's Dai / RaML pseudo-gradient term (scalar implicit learning rate η
  and a d×d map) and on the value-only baseline; held-out R² with GroupKFold by trace;
* (b) static thought patch (`probes.measures.fits.thought_patch.thought_patch_fit`): per trace and
  layer, one Ridge patch Δ for W_gate / W_up replacing the per-query exact rank-1 patches of the
  scaffold + answer rows;
  held-out R² over queries, summarised as the median over traces with a bootstrap CI;
* (b') the answer NLL when the trajectory is masked for those rows and the static patches, fitted
  on the scaffold rows before the answer only, act on the answer rows they never saw
  (`probes.measures.fits.thought_patch.thought_patch_nll`), against clean / masked / exact-patch NLLs.

`--random-init-control` repeats (a) and (b) on a seeded random-init model of the same architecture.
(c), ΔL̂ explained by the stored mechanistic features, needs no model and runs in `compare`.
"""

from __future__ import annotations

import time
from os import PathLike
from typing import Any

import numpy as np

from analyses.stats import bootstrap_ci
from hooks.model import LoadedModel
from probes.errors import ProbesError
from probes.measures.fits.pseudo_gradient import fit_pseudo_gradient, pseudo_gradient_samples
from probes.measures.fits.thought_patch import thought_patch_fit, thought_patch_nll
from probes.models.controls import random_init_model
from probes.models.spec import ModelSpec
from probes.pipeline.configs import (
    FitConfig,
    TraceSource,
    trace_source,
)
from probes.pipeline.loop import loader
from probes.traces.tokenize import tokenize_traces

NAME = "fit"


MIN_MASKING_LOSS = 0.1
"""Nats: traces whose masked NLL exceeds the clean one by less have no masking loss to recover and
are left out of `share_recovered` (its denominator)."""


def _median_ci(x: np.ndarray, n_boot: int, seed: int) -> tuple[float, list[float]]:
    x = np.asarray(x, float)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return float("nan"), [float("nan"), float("nan")]
    return float(np.median(x)), list(bootstrap_ci(x, n_boot=n_boot, seed=seed))


def _model_fits(loaded: LoadedModel, tts, cfg: FitConfig) -> dict[str, Any]:
    """(a), (b) and optionally (b') for one model."""

    rng = np.random.default_rng(cfg.seed)
    layers = list(cfg.layers) if cfg.layers is not None else None
    samples = [pseudo_gradient_samples(loaded, tt, layers=layers, max_tokens=cfg.max_tokens, rng=rng)
               for tt in tts]
    pg = fit_pseudo_gradient(samples)
    out: dict[str, Any] = {"pseudo_gradient": pg.to_dict(), "thought_patch": {}}
    for which in ("gate", "up"):
        fits = [thought_patch_fit(loaded, tt, which=which, layers=layers) for tt in tts]
        ho = np.stack([f.r2_heldout for f in fits])              # [n_traces, L']
        ins = np.stack([f.r2_in for f in fits])
        rows = []
        for j, layer in enumerate(fits[0].layers):
            med, ci = _median_ci(ho[:, j], cfg.n_boot, cfg.seed + j)
            rows.append({"layer": int(layer), "median_r2_heldout": med, "ci": ci,
                         "median_r2_in": float(np.median(ins[:, j])),
                         "median_delta_fro": float(np.median([f.delta_fro[j] for f in fits])),
                         "median_exact_fro_mean": float(np.median([f.exact_fro_mean[j]
                                                                   for f in fits]))})
        out["thought_patch"][which] = {"n_traces": len(fits), "k": [int(f.k) for f in fits],
                                       "alpha": fits[0].alpha, "layers": rows}
    if cfg.nll:
        res = []
        for tt in tts:
            t1, q = int(tt.spans["trajectory"][1]), int(tt.spans["answer"][0]) - 1
            if q - t1 < 2:
                continue  # fewer than 2 scaffold rows before the answer: nothing to fit on
            res.append(thought_patch_nll(loaded, tt, fit_rows=range(t1, q)))
        if res:
            nll = {k: _median_ci(np.array([getattr(r, k) for r in res]), cfg.n_boot, cfg.seed)
                   for k in ("nll_clean", "nll_masked", "nll_exact", "nll_static")}
            recovered = np.array([(r.nll_masked - r.nll_static) / (r.nll_masked - r.nll_clean)
                                  for r in res if r.nll_masked - r.nll_clean > MIN_MASKING_LOSS])
            out["thought_patch_nll"] = {
                "n_traces": len(res),
                "fit_rows": "scaffold rows before the answer (the answer rows are held out)",
                **{k: {"median": v[0], "ci": v[1]} for k, v in nll.items()},
                "share_recovered": dict(zip(("median", "ci"), _median_ci(recovered, cfg.n_boot,
                                                                         cfg.seed), strict=True)),
                "n_share_recovered": int(recovered.size),
                "max_logit_err_exact": float(max(r.max_logit_err_exact for r in res)),
            }
    return out


def fit_traces(model: ModelSpec | LoadedModel | str, traces: TraceSource | str | PathLike[str],
               cfg: FitConfig, *, device: str | None = None,
               dtype: str | None = None) -> dict[str, Any]:
    """Run the fits on the traces of a JSONL file.

    Args:
        model: A `ModelSpec` (or its name), or a loaded model.
        traces: A `TraceSource` (its limit at least 2), or the JSONL path (then the trace
            settings given to `cfg` in the older calling convention apply:
            `probes.pipeline.configs.trace_source`).
        cfg: Run settings.
        device, dtype: Replace the spec's device / dtype (the older calling convention).

    Returns:
        JSON-able report: `model`, `n_traces`, `trained` (and `random_init`), `seconds`.

    Raises:
        ProbesError: Bad input, fewer than 2 usable traces, an unsupported architecture.
    """

    source = trace_source(traces, cfg)
    traces_path = source.path
    if source.limit is not None and source.limit < 2:
        raise ProbesError(f"--limit must be at least 2 (the fits hold out traces), got "
                          f"{source.limit}")
    t0 = time.perf_counter()
    traceset = source.read()
    loaded = loader(model, device=device, dtype=dtype)()
    chosen = traceset.traces[: source.limit] if source.limit is not None else list(traceset.traces)
    tts, too_long = tokenize_traces(chosen, loaded.tokenizer, prompt_format=source.prompt_format,
                                    scaffold=source.scaffold, max_tokens=loaded.arch.n_ctx)
    usable = [tt for tt in tts if tt.spans["trajectory"][1] > tt.spans["trajectory"][0]
              and tt.spans["answer"][1] > tt.spans["answer"][0]]
    if len(usable) < 2:
        raise ProbesError(f"{traces_path} gives {len(usable)} traces with a trajectory and an answer; "
                          "the fits hold out whole traces and need at least 2")
    if cfg.layers is not None:
        bad = [l for l in cfg.layers if not 0 <= l < loaded.arch.n_layers]
        if bad:
            raise ProbesError(f"--layers {bad} out of range: the model has {loaded.arch.n_layers} "
                              "layers")
    report: dict[str, Any] = {
        "model": loaded.spec, "traces": str(traces_path), "n_traces": len(usable),
        "n_too_long": len(too_long), "n_bad_lines": len(traceset.problems),
        "trained": _model_fits(loaded, usable, cfg),
    }
    if cfg.random_init_control:
        report["random_init"] = _model_fits(random_init_model(loaded, cfg.seed), usable, cfg)
        report["random_init_seed"] = cfg.seed
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report

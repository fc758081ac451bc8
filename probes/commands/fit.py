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

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hooks.model import LoadedModel
from probes.commands import SUMMARIES, flags
from probes.errors import ProbesError
from probes.jsonable import jsonable
from probes.models.load import load_model
from probes.pipeline.progress import Stages, progress_on
from probes.safe_output import write_text

NAME = "fit"


MIN_MASKING_LOSS = 0.1
"""Nats: traces whose masked NLL exceeds the clean one by less have no masking loss to recover and
are left out of `share_recovered` (its denominator)."""


@dataclass(frozen=True, kw_only=True)
class FitConfig:
    """Settings of a `fit` run.

    Attributes:
        limit: Use only the first N traces (at least 2).
        strict: Fail on the first bad JSONL line.
        max_tokens: Per trace, at most this many trajectory tokens in (a) (random subsample).
        layers: Layers to fit (None: all).
        random_init_control: Also fit a random-init model of the same architecture.
        seed: Seed of the subsample, the random-init model and the bootstrap.
        n_boot: Bootstrap resamples of traces for (b)'s CIs.
        nll: Also run (b').
    """

    limit: int | None = None
    strict: bool = False
    max_tokens: int | None = None
    layers: tuple[int, ...] | None = None
    random_init_control: bool = False
    seed: int = 0
    n_boot: int = 1000
    nll: bool = True

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 2:
            raise ProbesError(f"--limit must be at least 2 (the fits hold out traces), got {self.limit}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ProbesError(f"--max-tokens must be at least 1, got {self.max_tokens}")


def _median_ci(x: np.ndarray, n_boot: int, seed: int) -> tuple[float, list[float]]:
    from analyses.stats import bootstrap_ci

    x = np.asarray(x, float)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return float("nan"), [float("nan"), float("nan")]
    return float(np.median(x)), list(bootstrap_ci(x, n_boot=n_boot, seed=seed))


def _model_fits(loaded: LoadedModel, tts, cfg: FitConfig) -> dict[str, Any]:
    """(a), (b) and optionally (b') for one model."""
    from probes.measures.fits.pseudo_gradient import fit_pseudo_gradient, pseudo_gradient_samples
    from probes.measures.fits.thought_patch import thought_patch_fit, thought_patch_nll

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


def fit_traces(model: str | LoadedModel, traces_path: Path, cfg: FitConfig, *,
               device: str = "auto", dtype: str = "float32") -> dict[str, Any]:
    """Run the fits on the traces of a JSONL file.

    Args:
        model: A model spec for `load_model`, or a loaded model.
        traces_path: JSONL traces.
        cfg: Run settings.
        device: Where the model runs.
        dtype: Model dtype.

    Returns:
        JSON-able report: `model`, `n_traces`, `trained` (and `random_init`), `seconds`.

    Raises:
        ProbesError: Bad input, fewer than 2 usable traces, an unsupported architecture.
    """
    from probes.models.controls import random_init_model
    from probes.traces.read import read_traces
    from probes.traces.tokenize import tokenize_traces

    t0 = time.perf_counter()
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device=device, dtype=dtype)
    traceset = read_traces(traces_path, strict=cfg.strict)
    traces = traceset.traces[: cfg.limit] if cfg.limit is not None else list(traceset.traces)
    tts, too_long = tokenize_traces(traces, loaded.tokenizer, max_tokens=loaded.arch.n_ctx)
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


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "nan" if x is None or (isinstance(x, float) and x != x) else format(x, spec)


def format_fit_report(r: dict[str, Any]) -> str:
    """Human form of `fit_traces`'s report."""
    models = [("trained", r["trained"])] + ([("random-init", r["random_init"])]
                                            if "random_init" in r else [])
    lines = [f"fits on {r['n_traces']} traces of {r['traces']} ({r['model']}, {r['seconds']:.1f}s)"]
    lines.append("(a) leave-one-out change of the answer row (M4) regressed on the pseudo-gradient "
                 "term (M3), held-out R² by trace (GroupKFold):")
    lines.append("  model        layer  eta        R2 scalar  R2 map  R2 value-map  R2 value-scalar")
    for name, m in models:
        pg = m["pseudo_gradient"]
        for i, layer in enumerate(pg["layers"]):
            lines.append(
                f"  {name:<12} {layer:>5}  {_fmt(pg['eta'][i], '.3g'):<9}  "
                f"{_fmt(pg['r2_scalar'][i]):>9}  {_fmt(pg['r2_map'][i]):>6}  "
                f"{_fmt(pg['r2_value_map'][i]):>12}  {_fmt(pg['r2_value_scalar'][i]):>15}"
            )
    lines.append("(b) static thought patch: median over traces of the held-out R² over queries "
                 "[95% CI]:")
    for name, m in models:
        for which, tp in m["thought_patch"].items():
            cells = ", ".join(f"L{row['layer']} {_fmt(row['median_r2_heldout'])} "
                              f"[{_fmt(row['ci'][0])}, {_fmt(row['ci'][1])}]" for row in tp["layers"])
            lines.append(f"  {name:<12} W_{which:<4} {cells}")
    for name, m in models:
        nll = m.get("thought_patch_nll")
        if nll:
            sr = nll["share_recovered"]
            lines.append(
                f"(b') {name}: answer NLL (median over {nll['n_traces']} traces) clean "
                f"{_fmt(nll['nll_clean']['median'], '.3g')}, trajectory masked "
                f"{_fmt(nll['nll_masked']['median'], '.3g')}, exact patches "
                f"{_fmt(nll['nll_exact']['median'], '.3g')}, static patch fitted on the scaffold "
                f"rows {_fmt(nll['nll_static']['median'], '.3g')}; share of the masking loss it "
                f"recovers {_fmt(sr['median'], '.2f')} [{_fmt(sr['ci'][0], '.2f')}, "
                f"{_fmt(sr['ci'][1], '.2f')}] ({nll['n_share_recovered']} traces where masking "
                f"costs > {MIN_MASKING_LOSS} nats)"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Command line


def add_parser(sub: Any) -> None:
    """Register `fit` and its flags."""
    p = sub.add_parser(
        NAME, formatter_class=flags.HelpFormatter,
        help=SUMMARIES[NAME],
        description=(
            "Needs the model. (a) Per layer: the exact leave-one-out change of the answer row's "
            "attention output caused by each trajectory token, regressed on the token's "
            "pseudo-gradient term (Dai dual form acting on the answer query): scalar implicit "
            "learning rate and a d x d map, against a value-only baseline; held-out R2 with "
            "GroupKFold by trace. (b) Per trace and layer: one static Ridge patch of W_gate / W_up "
            "replacing the exact per-query rank-1 patches of the scaffold + answer rows; held-out "
            "R2 over queries; and the answer NLL when it replaces the trajectory on the answer "
            "rows. dL-hat explained by the stored features runs in `compare`."
        ),
    )
    flags.model_flags(p)
    flags.traces_flags(p, limit_help="use only the first N traces (>= 2)", lexicon=False)
    p.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    p.add_argument("--layers", type=flags.nonnegative_int, nargs="+", default=None,
                   help="layers (default: all)")
    p.add_argument("--max-tokens", type=flags.positive_int, default=None,
                   help="(a): at most N random trajectory tokens per trace")
    p.add_argument("--random-init-control", action="store_true",
                   help="repeat the fits on a seeded random-init model of the same architecture")
    p.add_argument("--no-nll", action="store_true", help="skip the static-patch answer NLL")
    p.add_argument("--seed", type=flags.seed, default=0, help="seed of subsampling, random init, bootstrap")
    p.add_argument("--n-boot", type=flags.positive_int, default=1000, help="bootstrap resamples")
    flags.report_flags(p, json_help="print one JSON object instead of tables")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`fit` from parsed flags."""
    flags.silence_hf()
    if args.out is not None:
        from probes.pipeline.outputs import check_output_file

        check_output_file(args.out, "--out")
    cfg = FitConfig(limit=args.limit, strict=args.strict, max_tokens=args.max_tokens,
                    layers=tuple(args.layers) if args.layers else None,
                    random_init_control=args.random_init_control, seed=args.seed,
                    n_boot=args.n_boot, nll=not args.no_nll)
    with Stages(total=1, desc=NAME, enabled=progress_on(args.quiet)) as stages, \
            stages.working("model passes and fits"):
        report = jsonable(fit_traces(args.model, args.traces, cfg, device=args.device,
                                     dtype=args.model_dtype))
    if args.out is not None:
        write_text(args.out, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        print(f"fit: report written to {args.out}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, ensure_ascii=False, sort_keys=True))
    else:
        print(format_fit_report(report))
    return 0

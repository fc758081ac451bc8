"""`python -m probes.run study`: every analysis of one model on one traces file, into one folder.

The stages (`STAGES`, in this order) are the writing runners of this package, each into its
store in the folder (`STORES`; the model's L̂ and updates share `run.h5`):
`activations` (`probes.pipeline.capture`, opt-in), `lhat`, `updates`, `anchors` (the receiver /
suppression / resampling analyses asked for), `effects`, and
with `control="random-init"` the same L̂, updates and effects on a seeded random initialisation of
the same architecture (`lhat-control`, `updates-control`, `effects-control`). After them come the
steps that read the stores without the model (the comparisons and the report:
`probes.readouts.study.READOUT_STEPS`, passed in as `after`, since this package sits below the
readouts).

The folder's `study.json` (`MANIFEST`) records the settings and, per stage, its status ("done" or
"skipped" with the reason), its store, its seconds and its runner's summary; it is rewritten after
every stage. A rerun on the same folder with the same settings skips the stages the manifest has
done and runs the rest with the write loop's resume (`resume=True`: a store interrupted by a kill
is finished, its complete traces kept), so a run killed at any moment and run again gives the same
stores as one uninterrupted run. A folder whose manifest holds other settings is refused.

A model family a stage does not measure (the updates / effects families,
`probes.measures.updates.families`) skips that stage with the runner's own one-line refusal as the
reason, instead of failing the study; the refusal comes before its store is created.

Under torchrun every rank runs the stages (each runner shards its traces, `probes.pipeline.shards`);
the manifest and the `after` steps are rank 0's, after each store's index is written.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hooks.errors import UnsupportedModelError
from hooks.model import LoadedModel
from probes.errors import ProbesError
from probes.measures.effects.edits import EffectsError
from probes.measures.updates.attention import UpdatesError
from probes.models.controls import random_init_model
from probes.models.load import load_model
from probes.models.spec import ModelSpec, model_spec
from probes.pipeline.anchors import anchors_traces
from probes.pipeline.capture import cache_traces
from probes.pipeline.configs import (
    ANALYSES,
    AnchorsConfig,
    CacheConfig,
    EffectsConfig,
    LhatConfig,
    StudyConfig,
    UpdatesConfig,
)
from probes.pipeline.effects import effects_traces
from probes.pipeline.job import Log, WriteResult
from probes.pipeline.lhat import lhat_traces
from probes.pipeline.progress import Stages
from probes.pipeline.shards import current_shard
from probes.pipeline.shards import describe as describe_shard
from probes.pipeline.updates import updates_traces
from probes.safe_output import check_writable, write_text

NAME = "study"


MANIFEST = "study.json"
"""The study's manifest in its folder."""


STAGES: tuple[str, ...] = ("activations", "lhat", "updates", "anchors", "effects", "lhat-control",
                           "updates-control", "effects-control")
"""The stages that run the model, in the order they run."""


STORES: dict[str, str] = {
    "activations": "activations.h5", "lhat": "run.h5", "updates": "run.h5",
    "anchors": "anchors.h5", "effects": "effects.h5", "lhat-control": "lhat-control.h5",
    "updates-control": "random_init.h5", "effects-control": "effects-control.h5"}
"""The store of each stage, a file name in the study folder. The model's L̂ and updates share
`run.h5` (as `lhat` then `updates --resume` would write it), so that `compare` reads both together
(the ΔL̂ fit needs them in one store) and the report's token views carry every per-token array;
the control's updates are `random_init.h5` (`compare --control`'s), its L̂ `lhat-control.h5`
(compared alone: `compare` refuses a control's updates store as the compared cache); `effects`
also writes `effects.h5.directions.npz` beside its store."""


UNSUPPORTED: tuple[type[Exception], ...] = (UpdatesError, EffectsError, UnsupportedModelError)
"""The runners' refusals of a model family they do not measure (raised before their store is
created): the stage is skipped with the message as its reason."""


@dataclass(frozen=True)
class Step:
    """A step after the stages that reads the folder without the model (a comparison, the report).

    Attributes:
        name: Its name in the manifest and the summary.
        run: Called with the folder and the manifest's stage entries; returns its entry's extra
            fields (e.g. the files it wrote), or a string: the reason it is skipped.
    """

    name: str
    run: Callable[[Path, dict[str, dict[str, Any]]], dict[str, Any] | str]


@dataclass
class StudyResult:
    """What a study did.

    Attributes:
        out: The folder.
        manifest: Its `study.json` content.
        seconds: Wall time of this call.
    """

    out: Path
    manifest: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> list[str]:
        """One line per stage and step (done / already done / skipped and why), then the folder."""
        stages = self.manifest.get("stages", {})
        lines = []
        for k, (name, entry) in enumerate(stages.items(), 1):
            lines.append(f"[{k}/{len(stages)}] {name}: {describe(entry)}")
        lines.append(f"study: {self.out} ({self.seconds:.1f}s; manifest {self.out / MANIFEST})")
        return lines


def describe(entry: dict[str, Any]) -> str:
    """A manifest entry as words."""
    if entry["status"] == "skipped":
        return f"skipped: {entry['reason']}"
    what = entry.get("summary") or ", ".join(entry.get("files", []))
    if entry.get("refused"):
        what += f" (refused: {'; '.join(entry['refused'])})"
    again = " (already done)" if entry.get("again") else ""
    return f"done{again} in {entry.get('seconds', 0.0):.1f}s: {what}"


def planned(cfg: StudyConfig) -> dict[str, str | None]:
    """Each stage: None when it runs, else why not (not asked for)."""
    asked = set(cfg.analyses)

    def unless(ok: bool, flag: str) -> str | None:
        return None if ok else f"not asked ({flag} runs it)"

    own = {"activations": "activations", "lhat": "lhat", "updates": "updates",
           "anchors": ",".join(ANALYSES), "effects": "effects"}
    reasons = {stage: unless(bool(asked & set(names.split(","))), f"--analyses {names}")
               for stage, names in own.items()}
    for stage in ("lhat", "updates", "effects"):
        reasons[f"{stage}-control"] = (
            unless(cfg.control == "random-init", "--control random-init") or reasons[stage])
    return reasons


def check_study_out(out: Path, cfg: StudyConfig, settings: dict[str, Any]) -> dict[str, Any] | None:
    """Refuse a folder the study cannot write, or one holding a study of other settings (before
    any work); returns its manifest, if any.

    Raises:
        ProbesError: A file where the folder should be, an unwritable folder, a manifest of other
            settings or one that cannot be read.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ProbesError(f"--out {out} is a file; the study writes a folder: choose another --out")
    check_writable(out / MANIFEST, "--out", make_parents=True)
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        stored = manifest["settings"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ProbesError(f"cannot read {path} ({exc}); remove it to start the study again, or "
                          f"choose another --out") from None
    diff = [f"{k}: stored {stored.get(k)!r}, given {v!r}" for k, v in settings.items()
            if stored.get(k) != v]
    if diff:
        raise ProbesError(f"{out} holds a study made with other settings ({'; '.join(diff)}): pass "
                          f"the same flags to finish it, or choose another --out")
    return manifest


def study_traces(
    model: ModelSpec | LoadedModel | str,
    traces_path: Path,
    out: Path,
    cfg: StudyConfig,
    *,
    after: Sequence[Step] = (),
    device: str | None = None,
    dtype: str | None = None,
    progress: bool = True,
    log: Log | None = None,
) -> StudyResult:
    """Run every stage of the study into the folder `out` (resuming a study interrupted there),
    then the `after` steps.

    Args:
        model: A `ModelSpec` (or its name) for `load_model`, or a loaded model.
        traces_path: JSONL traces.
        out: The folder (created).
        cfg: Study settings.
        after: Steps run after the stages (rank 0 only).
        device: Where the model runs (replaces the spec's; the older calling convention).
        dtype: Model dtype (likewise).
        progress: One progress bar for the stages (and each stage's per-trace bar).
        log: Receives one-line messages (the runners' too).

    Returns:
        The folder and its manifest.

    Raises:
        ProbesError, CacheError, HooksError: Bad input (checked before the model loads: the folder,
            the traces file; then the model), a folder of another study, a store a stage refuses.
    """
    t0 = time.perf_counter()
    out, traces_path = Path(out), Path(traces_path)
    say = log if log is not None else (lambda _m: None)
    spec = model_spec(model, device=device, dtype=dtype)
    label = spec.name if isinstance(spec, ModelSpec) else spec.spec
    model_dtype = spec.dtype if isinstance(spec, ModelSpec) else (dtype or "float32")
    settings = {"model": label, "model_dtype": model_dtype,
                "traces": str(traces_path.resolve()), **cfg.settings()}
    manifest = check_study_out(out, cfg, settings)
    if not traces_path.is_file():
        raise ProbesError(f"--traces {traces_path} does not exist; give a JSONL traces file")
    shard = current_shard()
    lead = shard is None or shard.rank == 0
    done = {name: e for name, e in (manifest or {}).get("stages", {}).items()
            if e.get("status") == "done"}
    reasons = planned(cfg)
    to_run = [s for s in STAGES if reasons[s] is None and s not in done]
    loaded = None
    if to_run:
        if shard is not None:
            shard.pin_gpu()
        loaded = spec if isinstance(spec, LoadedModel) else load_model(spec)
    if lead:
        out.mkdir(parents=True, exist_ok=True)
    entries: dict[str, dict[str, Any]] = {}
    record = {"settings": settings, "stages": entries}

    def save() -> None:
        if lead:
            write_text(out / MANIFEST, json.dumps(record, indent=1, default=str) + "\n",
                       flag="--out")

    n_steps = len(to_run) + len(after)
    with Stages(total=n_steps, desc=NAME, enabled=progress) as bar:
        k = 0
        for stage in STAGES:
            if reasons[stage] is not None:
                entries[stage] = {"status": "skipped", "reason": reasons[stage]}
            elif stage in done:
                entries[stage] = {**done[stage], "again": True}
            else:
                k += 1
                bar.step(f"[{k}/{n_steps}] {stage}")
                say(f"study [{k}/{n_steps}] {stage} -> {out / STORES[stage]}")
                assert loaded is not None
                entries[stage] = _run_stage(stage, loaded, traces_path, out, cfg, progress, say)
                bar.advance()
            save()
        if lead:
            for step in after:
                k += 1
                bar.step(f"[{k}/{n_steps}] {step.name}")
                prior = (manifest or {}).get("stages", {}).get(step.name, {})
                if prior.get("status") == "done" and not to_run:
                    entries[step.name] = {**prior, "again": True}
                else:
                    clock = time.perf_counter()
                    got = step.run(out, entries)
                    entries[step.name] = (
                        {"status": "skipped", "reason": got} if isinstance(got, str) else
                        {"status": "done", **got,
                         "seconds": round(time.perf_counter() - clock, 3)})
                save()
                bar.advance()
    return StudyResult(out=out, manifest=record, seconds=time.perf_counter() - t0)


def _run_stage(stage: str, loaded: LoadedModel, traces: Path, out: Path, cfg: StudyConfig,
               progress: bool, say: Log) -> dict[str, Any]:
    """Run one stage with resume; a family the runner refuses before its store exists is skipped."""
    store = out / STORES[stage]
    existed = store.exists()
    clock = time.perf_counter()
    try:
        result = _runner(stage, cfg)(loaded, traces, store, progress, say)
    except UNSUPPORTED as exc:
        if store.exists() and not existed:
            raise
        say(f"study: {stage} skipped: {exc}")
        return {"status": "skipped", "reason": str(exc)}
    return {"status": "done", "store": STORES[stage], "summary": result.summary(),
            "seconds": round(time.perf_counter() - clock, 3),
            "n_written": result.n_written, "n_skipped": result.n_skipped,
            "n_left_out": result.n_left_out, "n_too_long": result.n_too_long,
            **describe_shard(current_shard())}  # under torchrun the counts are this rank's


StageRun = Callable[[LoadedModel, Path, Path, bool, Log], WriteResult]


def _runner(stage: str, cfg: StudyConfig) -> StageRun:
    """The runner call of a stage, with the study's shared settings and the runner's defaults."""
    common: dict[str, Any] = {"limit": cfg.limit, "strict": cfg.strict, "lexicon": cfg.lexicon,
                              "prompt_format": cfg.prompt_format, "scaffold": cfg.scaffold}
    control = stage.endswith("-control")

    if stage == "activations":
        return lambda m, t, o, p, log: cache_traces(m, t, o, CacheConfig(**common), resume=True,
                                                    progress=p, log=log)
    if stage.startswith("lhat"):
        def lhat(m: LoadedModel, t: Path, o: Path, p: bool, log: Log) -> WriteResult:
            if control:
                m = random_init_model(m, cfg.seed)
            return lhat_traces(m, t, o, LhatConfig(**common), resume=True, progress=p, log=log)

        return lhat
    if stage.startswith("updates"):
        ucfg = UpdatesConfig(**common, control="random-init" if control else "none", seed=cfg.seed)
        return lambda m, t, o, p, log: updates_traces(m, t, o, ucfg, resume=True, progress=p,
                                                      log=log)
    if stage == "anchors":
        acfg = AnchorsConfig(**common, analyses=tuple(a for a in ANALYSES if a in cfg.analyses))
        return lambda m, t, o, p, log: anchors_traces(m, t, o, acfg, resume=True, progress=p,
                                                      log=log)

    ecfg = EffectsConfig(**common, control="random-init" if control else "none",
                         control_seed=cfg.seed, pairs_per_category=cfg.pairs_per_category)
    return lambda m, t, o, p, log: effects_traces(m, t, o, ecfg, resume=True, progress=p, log=log)

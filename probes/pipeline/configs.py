"""Settings of the writing commands, one frozen dataclass per runner.

A light module (no torch): the command line builds its parsers from it without importing the runners."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from probes.errors import ProbesError
from probes.measures.anchors import (
    DEFAULT_THRESHOLD,
    PROXIMITY_IGNORE,
    SIMILARITY,
    TOP_K_HEADS,
    ResampleSettings,
)
from probes.measures.capture import (
    BACKENDS,
    BATCH_TOKENS,
    DEFAULT_COMPONENTS,
    POSITIONS,
    STORAGE_DTYPES,
    check_choice,
)
from probes.measures.lhat import DEFAULT_CHUNK_SIZE, DEFAULT_MAX_PACK_TOKENS
from probes.measures.updates import ANSWER_ROWS, ATTENTION_PATHS
from probes.models.choices import CONTROLS
from probes.traces.tokenize import DEFAULT_SCAFFOLD


@dataclass(frozen=True)
class CacheConfig:
    """What to cache and how.

    Attributes:
        sites: Components for every layer ("resid_post", "delta", "attn_out", "mlp_out", ...),
            explicit sites ("L3.resid_post") or global components ("embed", "ln_final"). Each
            component becomes one dataset `[n_sel, n_layers, d]` (global ones `[n_sel, d]`).
        positions: "trajectory" (rows for trajectory tokens) or "all" (every token).
        dtype: Storage dtype: "float16" (default), "float32" or "bfloat16".
        chunk_size: Tokens per forward through the KV cache (prefill chunk); bounds memory.
        batch_tokens: Traces no longer than `chunk_size` run several per forward, right-padded,
            up to this many padded tokens, and are committed together (`hf` backend; 0: one
            trace per forward). Equal to one forward each up to float rounding.
        limit: Use only the first `limit` traces of the file (None: all).
        prompt_format: Prompt template with `{question}` (None: the chat template, else
            `probes.traces.tokenize.DEFAULT_PROMPT_TEMPLATE`).
        scaffold: Text between trajectory and answer (RaML's by default).
        lexicon: Extra lexicon JSON files merged into the built-in one.
        backend: "auto", "hf" (plain HF forward, residual-level components only) or "bridge".
        max_ram_mib: Per-trace output up to this size is held in RAM; larger outputs are spooled
            to a temporary file beside the cache (0: always spool).
        strict: Fail on the first bad JSONL line instead of skipping it.

    Raises:
        ProbesError: For a value outside the allowed ones.
    """

    sites: tuple[str, ...] = DEFAULT_COMPONENTS
    positions: str = "trajectory"
    dtype: str = "float16"
    chunk_size: int = 512
    batch_tokens: int = BATCH_TOKENS
    limit: int | None = None
    prompt_format: str | None = None
    scaffold: str = DEFAULT_SCAFFOLD
    lexicon: tuple[str, ...] = ()
    backend: str = "auto"
    max_ram_mib: float = 64.0
    strict: bool = False

    def __post_init__(self) -> None:
        sites = (self.sites,) if isinstance(self.sites, str) else tuple(self.sites)
        object.__setattr__(self, "sites", sites)
        object.__setattr__(self, "lexicon", tuple(str(p) for p in self.lexicon))
        if not sites or not all(isinstance(s, str) and s for s in sites):
            raise ProbesError(f"sites must be a non-empty list of site strings, got {self.sites!r}; "
                              f"e.g. {list(DEFAULT_COMPONENTS)} or ['L3.resid_post']")
        check_choice("positions", self.positions, POSITIONS)
        check_choice("dtype", self.dtype, STORAGE_DTYPES)
        check_choice("backend", self.backend, BACKENDS)
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or (
                self.chunk_size < 1):
            raise ProbesError(f"chunk_size must be a positive integer, got {self.chunk_size!r}")
        if isinstance(self.batch_tokens, bool) or not isinstance(self.batch_tokens, int) or (
                self.batch_tokens < 0):
            raise ProbesError(f"batch_tokens must be an integer >= 0, got {self.batch_tokens!r}")
        if self.limit is not None and (
                isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1):
            raise ProbesError(f"limit must be a positive integer or None, got {self.limit!r}")
        if not isinstance(self.max_ram_mib, (int, float)) or self.max_ram_mib < 0:
            raise ProbesError(f"max_ram_mib must be a number >= 0, got {self.max_ram_mib!r}")


@dataclass(frozen=True, kw_only=True)
class LhatConfig:
    """Settings of an `lhat` run (ranges are checked by the parser and by the measurement).

    Attributes:
        check_naive: Per trace, re-run this many random prefixes one forward each (the RaML
            method) and record the largest |fast − naive|.
        seed: Seed of the prefix sampling for `check_naive`.
        chunk_size: Prefill chunk (tokens) through the KV cache.
        max_pack_tokens: Tokens per packed forward of scaffold + answer copies.
        limit: Use only the first N traces.
        strict: Fail on the first bad JSONL line.
        lexicon: Extra lexicon JSON files merged into the built-in one.
        prompt_format: Prompt format string; None = chat template or the documented default.
        scaffold: The answer scaffold appended after each prefix.
        no_thinking: Replace each trajectory by the NoThinking delimiter (RaML's no-thinking mode),
            for the thinking vs no-thinking comparison.
    """

    check_naive: int = 0
    seed: int = 0
    chunk_size: int = DEFAULT_CHUNK_SIZE
    max_pack_tokens: int = DEFAULT_MAX_PACK_TOKENS
    limit: int | None = None
    strict: bool = False
    lexicon: tuple[str, ...] = ()
    prompt_format: str | None = None
    scaffold: str = DEFAULT_SCAFFOLD
    no_thinking: bool = False


@dataclass(frozen=True, kw_only=True)
class UpdatesConfig:
    """Settings of an `updates` run.

    Attributes:
        control: "none" (the trained weights) or "random-init" (same architecture, random weights).
        seed: Seed of the random initialisation for `control="random-init"`.
        limit: Use only the first N traces.
        strict: Fail on the first bad JSONL line.
        lexicon: Extra lexicon JSON files merged into the built-in one.
        layers: Store only these layers (rows of every array, in this order; recorded in the
            trace attribute `upd_layers`); None: all layers.
        prompt_format: Prompt format string; None = chat template or the documented default.
        scaffold: The answer scaffold between trajectory and answer.
        answer_rows: "first": M1–M6 at the first answer row q = answer start − 1 only; "mean":
            measured at every answer row of 𝒬 and averaged over the rows (recorded in the trace
            attribute `upd_rows`; M7 is the sum over 𝒬 either way).
        attention: The pass: "auto" (the eager reference while its attention patterns fit
            `EAGER_PATTERN_BUDGET`, else the linear-memory pass), "sdpa" or "eager"; equal to
            float32 rounding, so not part of the file's identity.
    """

    control: str = "none"
    seed: int = 0
    limit: int | None = None
    strict: bool = False
    lexicon: tuple[str, ...] = ()
    layers: tuple[int, ...] | None = None
    prompt_format: str | None = None
    scaffold: str = DEFAULT_SCAFFOLD
    answer_rows: str = "first"
    attention: str = "auto"

    def __post_init__(self) -> None:
        if self.control not in CONTROLS:
            raise ProbesError(f"--control must be one of {', '.join(CONTROLS)}, got {self.control!r}")
        if self.attention not in ("auto", *ATTENTION_PATHS):
            raise ProbesError(f"--attention must be one of auto, {', '.join(ATTENTION_PATHS)}, got "
                              f"{self.attention!r}")
        if self.answer_rows not in ANSWER_ROWS:
            raise ProbesError(f"--answer-rows must be one of {', '.join(ANSWER_ROWS)}, got "
                              f"{self.answer_rows!r}")
        if self.layers is not None and (not self.layers or len(set(self.layers)) != len(self.layers)
                                        or list(self.layers) != sorted(self.layers)):
            raise ProbesError(f"--layers must be distinct and increasing, got {list(self.layers)}")
        if self.limit is not None and self.limit < 1:
            raise ProbesError(f"--limit must be at least 1, got {self.limit}")


@dataclass(frozen=True, kw_only=True)
class LandscapeConfig:
    """Settings of a `landscape` run.

    Attributes:
        grid: Points per axis (odd puts the origin on the grid).
        span: Random-plane axes run over [−span, span] (units of the normalised directions).
        style: "raml" or "filter" direction normalisation.
        seed: Seed of the random directions.
        positions: "kept" (original position ids; the path's endpoint is exact) or "shifted".
        margin: The path-plane grid spans margin × the path's largest coordinate.
        batch: Weight perturbations per batched forward.
        limit, strict, lexicon: As in every command.
        plot_dir: Write three PNGs per trace there (None: no plots).
    """

    grid: int = 21
    span: float = 1.0
    style: str = "raml"
    seed: int = 0
    positions: str = "kept"
    margin: float = 1.5
    batch: int = 128
    limit: int | None = None
    strict: bool = False
    lexicon: tuple[str, ...] = ()
    plot_dir: Path | None = None

    def own(self) -> dict[str, Any]:
        """The settings that decide the stored arrays (stored as trace attributes, the seed of the
        directions among them; checked on `--resume`)."""
        return {"land_grid_n": self.grid, "land_range": self.span, "land_style": self.style,
                "land_seed": self.seed, "land_positions": self.positions,
                "land_margin": self.margin}


ANALYSES: tuple[str, ...] = ("receiver", "suppression", "resampling")
"""What `--analyses` may ask for (chunks are always written)."""


DEFAULT_ANALYSES = ("receiver", "suppression")
"""The white-box analyses (resampling samples from the model and costs more: ask for it)."""


@dataclass(frozen=True, kw_only=True)
class AnchorsConfig:
    """Settings of an `anchors` run.

    Attributes:
        analyses: A subset of `ANALYSES`.
        proximity_ignore: Vertical scores ignore query chunks closer than this.
        top_heads: Receiver heads kept (top-k by mean kurtosis).
        supp_batch: Masked variants per suppression forward (None: from a memory budget).
        supp_temperature: Temperature of the suppression KL.
        resample: Sampling settings.
        similarity: `probes.measures.anchors.resampling.SIMILARITY`.
        embedding_model: A local folder of a sentence-embedding model (similarity "embedding").
        threshold: Cosine below which a resample is dissimilar.
        prob_true: CI_KL as the binary KL of P(correct).
        plots: A folder for the PNG plots (`analyses.anchor_plots`), or None.
        limit, strict, lexicon, prompt_format, scaffold: As every writing command.
    """

    analyses: tuple[str, ...] = DEFAULT_ANALYSES
    proximity_ignore: int = PROXIMITY_IGNORE
    top_heads: int = TOP_K_HEADS
    supp_batch: int | None = None
    supp_temperature: float = 1.0
    resample: ResampleSettings = field(default_factory=ResampleSettings)
    similarity: str = "exact"
    embedding_model: str | None = None
    threshold: float = DEFAULT_THRESHOLD
    prob_true: bool = False
    plots: str | None = None
    limit: int | None = None
    strict: bool = False
    lexicon: tuple[str, ...] = ()
    prompt_format: str | None = None
    scaffold: str = DEFAULT_SCAFFOLD

    def check(self) -> None:
        """Refuse bad settings before any work (one `ProbesError` naming the flag)."""
        bad = [a for a in self.analyses if a not in ANALYSES]
        if bad or not self.analyses:
            raise ProbesError(f"--analyses {','.join(self.analyses)}: choose from "
                              f"{', '.join(ANALYSES)} (comma-separated)")
        if "resampling" in self.analyses:
            self.resample.check()
            if self.similarity not in SIMILARITY:
                raise ProbesError(f"--similarity {self.similarity!r}: choose one of "
                                  f"{', '.join(SIMILARITY)}")
            if self.similarity == "embedding" and not self.embedding_model:
                raise ProbesError("--similarity embedding needs --embedding-model (a local folder "
                                  "of a sentence-embedding model); or use --similarity exact")
            if self.embedding_model and not Path(self.embedding_model).is_dir():
                raise ProbesError(f"--embedding-model {self.embedding_model}: no such folder; give "
                                  f"a local model folder")

    def settings(self, analysis: str) -> str:
        """The settings that change an analysis's arrays, as JSON (stored as the trace attribute
        `anchors_<analysis>`; a trace that has the analysis with other settings is refused)."""
        own: dict[str, Any] = {
            "receiver": {"proximity_ignore": self.proximity_ignore},
            "suppression": {"temperature": self.supp_temperature},
            "resampling": {**{k: v for k, v in asdict(self.resample).items() if k != "batch_rows"},
                           "similarity": self.similarity, "embedding_model": self.embedding_model,
                           "threshold": self.threshold, "prob_true": self.prob_true},
        }[analysis]
        return json.dumps(own, sort_keys=True)


@dataclass(frozen=True, kw_only=True)
class EffectsConfig:
    """Settings of an `effects` run.

    Attributes:
        pairs_per_category: Sampled (layer, token) pairs per category and trace.
        batch_size: Edited forwards per batch.
        scale: ε of both edits (1 = remove the whole update).
        seed: Seed of the pair sampling (combined with each trace id) and of the probe split.
        control: "none" or "random-init" (same architecture, seeded random weights).
        control_seed: Seed of the random initialisation.
        limit, strict, lexicon, prompt_format, scaffold: As for every writing command.
    """

    pairs_per_category: int = 30
    batch_size: int = 16
    scale: float = 1.0
    seed: int = 0
    control: str = "none"
    control_seed: int = 0
    limit: int | None = None
    strict: bool = False
    lexicon: tuple[str, ...] = ()
    prompt_format: str | None = None
    scaffold: str = DEFAULT_SCAFFOLD

    def __post_init__(self) -> None:
        if self.pairs_per_category < 1:
            raise ProbesError(f"--pairs-per-category must be at least 1, got "
                              f"{self.pairs_per_category}")
        if self.batch_size < 1:
            raise ProbesError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not 0 < self.scale <= 1:
            raise ProbesError(f"--scale must be in (0, 1], got {self.scale}")
        if self.control not in CONTROLS:
            raise ProbesError(f"--control must be one of {', '.join(CONTROLS)}, got "
                              f"{self.control!r}")

    def own(self) -> dict[str, Any]:
        """The settings that change the stored arrays: stored as trace attributes, and an existing
        cache's must equal them (`--resume`)."""
        return {"eff_pairs_per_category": self.pairs_per_category, "eff_scale": self.scale,
                "eff_seed": self.seed, "eff_control": self.control,
                "eff_control_seed": self.control_seed}


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


STUDY_ANALYSES: tuple[str, ...] = ("activations", "lhat", "updates", "receiver", "suppression",
                                   "resampling", "effects")
"""What `study --analyses` may ask for: `activations` (the `cache` stage), `lhat`, `updates`, the
`anchors` analyses (`ANALYSES`: one `anchors` stage runs those asked) and `effects`."""


DEFAULT_STUDY_ANALYSES: tuple[str, ...] = ("lhat", "updates", "receiver", "suppression", "effects")
"""The analyses a study runs unless `--analyses` says otherwise (activations take disk and
resampling generates: ask for them)."""


@dataclass(frozen=True, kw_only=True)
class StudyConfig:
    """Settings of a `study` run (every stage's own settings are its runner's defaults).

    Attributes:
        analyses: A subset of `STUDY_ANALYSES`.
        control: "none", or "random-init": L̂, updates and effects also on a seeded random
            initialisation of the same architecture.
        seed: Seed of the random-init control.
        pairs_per_category: The effects stage's sampled (layer, token) pairs per category and
            trace (`EffectsConfig.pairs_per_category`; its cost grows with it).
        limit, strict, lexicon, prompt_format, scaffold: As for every writing command.
    """

    analyses: tuple[str, ...] = DEFAULT_STUDY_ANALYSES
    control: str = "none"
    seed: int = 0
    pairs_per_category: int = EffectsConfig.pairs_per_category
    limit: int | None = None
    strict: bool = False
    lexicon: tuple[str, ...] = ()
    prompt_format: str | None = None
    scaffold: str = DEFAULT_SCAFFOLD

    def __post_init__(self) -> None:
        object.__setattr__(self, "analyses", tuple(self.analyses))
        object.__setattr__(self, "lexicon", tuple(str(p) for p in self.lexicon))
        bad = [a for a in self.analyses if a not in STUDY_ANALYSES]
        if bad or not self.analyses:
            raise ProbesError(f"--analyses {','.join(self.analyses)}: choose from "
                              f"{', '.join(STUDY_ANALYSES)} (comma-separated)")
        if self.control not in CONTROLS:
            raise ProbesError(f"--control must be one of {', '.join(CONTROLS)}, got {self.control!r}")

    def settings(self) -> dict[str, Any]:
        """The settings as JSON-able values (recorded in the study manifest; a rerun must match)."""
        return {**asdict(self), "analyses": list(self.analyses), "lexicon": list(self.lexicon)}

"""Settings of the writing commands: `TraceSource` (the traces every runner reads and how they are
tokenized) and one frozen dataclass per runner with its own settings only.

A light module (no torch): the command line builds its parsers from it without importing the
runners (`probes.commands.flags.dataclass_flags`: one flag per field; a field's `metadata` gives
its flag name, argparse type (by name), choices and help where the docstring's line is not it)."""

from __future__ import annotations

import json
from dataclasses import InitVar, asdict, dataclass, field
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

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
from probes.measures.landscape import POSITIONS as LANDSCAPE_POSITIONS
from probes.measures.landscape import STYLES
from probes.measures.lhat import DEFAULT_CHUNK_SIZE, DEFAULT_MAX_PACK_TOKENS
from probes.measures.updates import ANSWER_ROWS, ATTENTION_PATHS
from probes.models.choices import CONTROLS
from probes.traces.tokenize import DEFAULT_SCAFFOLD, render_prompt

if TYPE_CHECKING:
    from probes.traces.read import TraceSet

C = TypeVar("C")


@dataclass(frozen=True)
class TraceSource:
    """The traces a runner reads, and how they are tokenized (shared by every runner).

    Attributes:
        path: JSONL traces.
        limit: Use only the first N traces (None: all).
        lexicon: Extra lexicon JSON files merged into the built-in one (repeatable).
        prompt_format: Prompt template with {question} (None: the tokenizer's chat template, else
            the documented prompt).
        scaffold: Text between the trajectory and the answer (RaML's answer scaffold); part of what
            a cache records, so --resume needs the same one.

    Raises:
        ProbesError: For a limit below 1, or a prompt format without `{question}` or with other
            fields (`probes.traces.tokenize.render_prompt`'s checks).
    """

    path: Path = field(metadata={"flag": "--traces", "type": "path", "required": True,
                                 "help": "JSONL traces"})
    limit: int | None = field(default=None, metadata={
        "type": "positive_int", "metavar": "N", "help": "use only the first N traces"})
    strict: bool = field(default=False, metadata={
        "help": "fail on the first bad JSONL line instead of skipping it"})
    lexicon: tuple[str, ...] = field(default=(), metadata={
        "type": "path", "action": "append", "convert": lambda paths: tuple(str(p) for p in paths),
        "help": "extra lexicon JSON merged into the built-in one (repeatable)"})
    prompt_format: str | None = field(default=None, metadata={
        "metavar": "TEMPLATE",
        "help": "prompt template with {question} (none given: the tokenizer's chat template, else "
                "the documented prompt)"})
    scaffold: str = field(default=DEFAULT_SCAFFOLD, metadata={
        "help": "text between the trajectory and the answer (RaML's answer scaffold, "
                "%(default)r); part of what a cache records, so --resume needs the same one"})

    def __post_init__(self) -> None:
        if not isinstance(self.path, (str, PathLike)):
            raise ProbesError(f"traces: expected a JSONL path, got {self.path!r}")
        object.__setattr__(self, "path", Path(self.path))
        lexicon = (self.lexicon,) if isinstance(self.lexicon, (str, PathLike)) else self.lexicon
        object.__setattr__(self, "lexicon", tuple(str(p) for p in lexicon))
        if self.limit is not None and (
                isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1):
            raise ProbesError(f"--limit must be a positive integer, got {self.limit!r}")
        if self.prompt_format is not None:  # its checks, before any model loads
            render_prompt("", None, prompt_format=self.prompt_format)

    def read(self) -> TraceSet:
        """The traces file, read (`probes.traces.read.read_traces`; `strict` as set)."""
        from probes.traces.read import read_traces  # here: keeps the flag-building module small

        return read_traces(self.path, strict=self.strict)


TRACE_KEYS: tuple[str, ...] = ("limit", "strict", "lexicon", "prompt_format", "scaffold")
"""The `TraceSource` settings the runner configs used to repeat each."""


@dataclass(frozen=True, kw_only=True)
class TakesTraceSettings:
    """Transition: a runner config still takes the `TRACE_KEYS` keywords it used to hold
    (`LhatConfig(limit=2)`, visible to type checkers), kept aside for `trace_source`: init-only
    (not fields, so not flags, not compared). Each config checks its own settings in `_check`."""

    limit: InitVar[int | None] = None
    strict: InitVar[bool] = False
    lexicon: InitVar[tuple[str, ...]] = ()
    prompt_format: InitVar[str | None] = None
    scaffold: InitVar[str] = DEFAULT_SCAFFOLD

    def __post_init__(self, limit: int | None, strict: bool, lexicon: tuple[str, ...],
                      prompt_format: str | None, scaffold: str) -> None:
        values = dict(zip(TRACE_KEYS, (limit, strict, lexicon, prompt_format, scaffold),
                          strict=True))
        given = {k: v for k, v in values.items() if v != _TRACE_DEFAULTS[k]}
        if given:
            TraceSource(Path(), **given)  # checked now, as when they were the config's fields
        object.__setattr__(self, "_trace_settings", given)
        self._check()

    def _check(self) -> None:
        """Refuse the config's own bad settings (`ProbesError` naming the flag)."""


_TRACE_DEFAULTS: dict[str, Any] = {"limit": None, "strict": False, "lexicon": (),
                                   "prompt_format": None, "scaffold": DEFAULT_SCAFFOLD}


def trace_source(traces: TraceSource | str | PathLike[str], cfg: object = None) -> TraceSource:
    """A runner's traces as a `TraceSource`: the one given, or a path with the trace settings its
    config was given in the older calling convention (`LhatConfig(limit=2, scaffold=...)`).

    Raises:
        ProbesError: A `TraceSource` together with trace settings in the config (say them once).
    """
    given: dict[str, Any] = dict(getattr(cfg, "_trace_settings", None) or {})
    if isinstance(traces, TraceSource):
        if given:
            raise ProbesError(f"{', '.join(sorted(given))}: given both in the TraceSource and in "
                              f"the {type(cfg).__name__}; give them in the TraceSource only")
        return traces
    return TraceSource(Path(traces), **given)



@dataclass(frozen=True)
class CacheConfig(TakesTraceSettings):
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
        backend: "auto", "hf" (plain HF forward, residual-level components only) or "bridge".
        max_ram_mib: Per-trace output up to this size is held in RAM; larger outputs are spooled
            to a temporary file beside the cache (0: always spool).

    Raises:
        ProbesError: For a value outside the allowed ones.
    """

    sites: tuple[str, ...] = field(default=DEFAULT_COMPONENTS, metadata={
        "nargs": "+", "metavar": "SITE",
        "convert": lambda items: tuple(s for item in items for s in item.split(",") if s),
        "help": "components for every layer (resid_post, delta, attn_out, mlp_out, resid_pre, "
                "resid_mid, ...), explicit sites such as L3.resid_post, or global ones (embed, "
                "ln_final); space- or comma-separated"})
    positions: str = field(default="trajectory", metadata={
        "choices": POSITIONS, "help": "tokens that get rows: the trajectory or every token"})
    dtype: str = field(default="float16", metadata={"choices": STORAGE_DTYPES,
                                                    "help": "storage dtype of the sites"})
    chunk_size: int = field(default=512, metadata={
        "type": "positive_int", "help": "tokens per forward through the KV cache"})
    batch_tokens: int = field(default=BATCH_TOKENS, metadata={
        "type": "nonnegative_int",
        "help": "traces up to --chunk-size tokens run several per forward (right-padded) up to "
                "this many padded tokens, committed together; 0: one per forward"})
    backend: str = field(default="auto", metadata={
        "choices": BACKENDS,
        "help": "hf: plain HF forward (residual-level sites); bridge: TransformerLens hooks (any "
                "site); auto: hf when the sites allow it"})
    max_ram_mib: float = field(default=64.0, metadata={
        "type": "nonnegative_float",
        "help": "per-trace output above this size is spooled to a temporary file beside --out "
                "instead of RAM"})

    def _check(self) -> None:
        sites = (self.sites,) if isinstance(self.sites, str) else tuple(self.sites)
        object.__setattr__(self, "sites", sites)
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
        if not isinstance(self.max_ram_mib, (int, float)) or self.max_ram_mib < 0:
            raise ProbesError(f"max_ram_mib must be a number >= 0, got {self.max_ram_mib!r}")


@dataclass(frozen=True, kw_only=True)
class LhatConfig(TakesTraceSettings):
    """Settings of an `lhat` run (ranges are checked by the parser and by the measurement).

    Attributes:
        check_naive: Per trace, re-run this many random prefixes one forward each (the RaML
            method) and record the largest |fast − naive|.
        seed: Seed of the prefix sampling for `check_naive`.
        chunk_size: Prefill chunk (tokens) through the KV cache.
        max_pack_tokens: Tokens per packed forward of scaffold + answer copies.
        no_thinking: Replace each trajectory by the NoThinking delimiter (RaML's no-thinking mode),
            for the thinking vs no-thinking comparison.
    """

    check_naive: int = field(default=0, metadata={
        "type": "nonnegative_int", "metavar": "K",
        "help": "re-run K random prefixes per trace one forward each and report the largest "
                "|fast - naive|"})
    seed: int = field(default=0, metadata={"type": "seed",
                                           "help": "seed of the --check-naive prefixes"})
    chunk_size: int = field(default=DEFAULT_CHUNK_SIZE, metadata={"type": "positive_int",
                                                                   "help": "prefill chunk"})
    max_pack_tokens: int = field(default=DEFAULT_MAX_PACK_TOKENS, metadata={
        "type": "positive_int", "help": "tokens per packed forward of scaffold+answer copies"})
    no_thinking: bool = field(default=False, metadata={
        "help": "replace each trajectory by the NoThinking delimiter (write to another --out)"})


@dataclass(frozen=True, kw_only=True)
class UpdatesConfig(TakesTraceSettings):
    """Settings of an `updates` run.

    Attributes:
        control: "none" (the trained weights) or "random-init" (same architecture, random weights).
        seed: Seed of the random initialisation for `control="random-init"`.
        layers: Store only these layers (rows of every array, in this order; recorded in the
            trace attribute `upd_layers`); None: all layers.
        answer_rows: "first": M1–M6 at the first answer row q = answer start − 1 only; "mean":
            measured at every answer row of 𝒬 and averaged over the rows (recorded in the trace
            attribute `upd_rows`; M7 is the sum over 𝒬 either way).
        attention: The pass: "auto" (the eager reference while its attention patterns fit
            `EAGER_PATTERN_BUDGET`, else the linear-memory pass), "sdpa" or "eager"; equal to
            float32 rounding, so not part of the file's identity.
    """

    control: str = field(default="none", metadata={
        "choices": CONTROLS,
        "help": "none: the trained weights; random-init: a seeded random initialisation of the "
                "same architecture (needs its own --out)"})
    seed: int = field(default=0, metadata={"type": "seed", "help": "seed of --control random-init"})
    layers: tuple[int, ...] | None = field(default=None, metadata={
        "type": "nonnegative_int", "nargs": "+",
        "help": "store only these layers (increasing; default: all)"})
    answer_rows: str = field(default="first", metadata={
        "choices": ANSWER_ROWS,
        "help": "first: at the row predicting the first answer token; mean: at every "
                "answer-predicting row, averaged over the rows (recorded in upd_rows; one mode per "
                "cache: write the other to another --out)"})
    attention: str = field(default="auto", metadata={
        "choices": ("auto", *ATTENTION_PATHS),
        "help": "auto: the eager reference pass while its attention patterns fit 64 MiB, else the "
                "linear-memory pass (memory linear in the trace length); sdpa or eager: always "
                "that pass"})

    def _check(self) -> None:
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


@dataclass(frozen=True, kw_only=True)
class LandscapeConfig(TakesTraceSettings):
    """Settings of a `landscape` run.

    Attributes:
        grid: Points per axis (odd puts the origin on the grid).
        span: Random-plane axes run over [−span, span] (units of the normalised directions).
        style: "raml" or "filter" direction normalisation.
        seed: Seed of the random directions.
        positions: "kept" (original position ids; the path's endpoint is exact) or "shifted".
        margin: The path-plane grid spans margin × the path's largest coordinate.
        batch: Weight perturbations per batched forward.
        plot_dir: Write three PNGs per trace there (None: no plots).
    """

    grid: int = field(default=21, metadata={
        "type": "positive_int", "metavar": "N",
        "help": "grid points per axis (odd: the origin is on the grid; RaML used 10)"})
    span: float = field(default=1.0, metadata={
        "flag": "--range", "type": "positive_float", "metavar": "R",
        "help": "random-plane axes run over [-R, R] in units of the normalised directions"})
    style: str = field(default="raml", metadata={
        "choices": STYLES,
        "help": "direction normalisation: raml (tensor-wise) or filter (Li et al.)"})
    seed: int = field(default=0, metadata={"type": "seed",
                                           "help": "seed of the two random directions"})
    positions: str = field(default="kept", metadata={
        "choices": LANDSCAPE_POSITIONS,
        "help": "position ids of the trajectory-free input: kept (a gap where the trajectory "
                "was, the convention in which the path endpoint is exact) or shifted "
                "(renumbered, a truncated run)"})
    margin: float = field(default=1.5, metadata={
        "type": "positive_float",
        "help": "the path-plane grid spans MARGIN x the path's largest coordinate"})
    batch: int = field(default=128, metadata={"type": "positive_int",
                                              "help": "weight perturbations per batched forward"})
    plot_dir: Path | None = field(default=None, metadata={
        "type": "path",
        "help": "write three plots per trace there: the random plane and the path plane "
                "(contours, the path, reflection and delimiter steps marked) and the loss along "
                "the path"})

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
class AnchorsConfig(TakesTraceSettings):
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
    """

    analyses: tuple[str, ...] = field(default=DEFAULT_ANALYSES, metadata={
        "help": f"comma-separated subset of {', '.join(ANALYSES)}"})
    proximity_ignore: int = field(default=PROXIMITY_IGNORE, metadata={
        "type": "nonnegative_int",
        "help": "vertical scores ignore query chunks closer than this"})
    top_heads: int = field(default=TOP_K_HEADS, metadata={
        "type": "positive_int", "help": "receiver heads: top-k by mean kurtosis"})
    supp_batch: int | None = field(default=None, metadata={
        "type": "positive_int",
        "help": "masked variants per suppression forward (default: from a 1 GiB budget)"})
    supp_temperature: float = field(default=1.0, metadata={
        "type": "positive_float", "help": "temperature of the suppression KL"})
    resample: ResampleSettings = field(default_factory=ResampleSettings, metadata={
        "flag": None})  # its own flags: `probes.commands.anchors.RESAMPLE_FLAGS`
    similarity: str = field(default="exact", metadata={
        "choices": SIMILARITY,
        "help": "how a resampled first chunk is judged the same as the original"})
    embedding_model: str | None = field(default=None, metadata={
        "help": "local folder of a sentence-embedding model (--similarity embedding)"})
    threshold: float = field(default=DEFAULT_THRESHOLD, metadata={
        "type": "probability", "help": "embedding cosine below which a resample is dissimilar"})
    prob_true: bool = field(default=False, metadata={
        "help": "counterfactual KL as the binary KL of P(correct)"})
    plots: str | None = field(default=None, metadata={
        "type": "path", "metavar": "DIR", "convert": str,
        "help": "write PNG plots (receiver-head kurtosis, suppression matrix, chunk importance of "
                "the first trace) into DIR"})

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
class EffectsConfig(TakesTraceSettings):
    """Settings of an `effects` run.

    Attributes:
        pairs_per_category: Sampled (layer, token) pairs per category and trace.
        batch_size: Edited forwards per batch.
        scale: ε of both edits (1 = remove the whole update).
        seed: Seed of the pair sampling (combined with each trace id) and of the probe split.
        control: "none" or "random-init" (same architecture, seeded random weights).
        control_seed: Seed of the random initialisation.
    """

    pairs_per_category: int = field(default=30, metadata={
        "type": "positive_int", "help": "(layer, token) pairs per category and trace"})
    batch_size: int = field(default=16, metadata={
        "type": "positive_int", "help": "edited copies of the trace per forward"})
    scale: float = field(default=1.0, metadata={
        "type": "unit_interval",
        "help": "ε in (0, 1]: remove ε times the update (small ε: first-order regime)"})
    seed: int = field(default=0, metadata={
        "type": "seed", "help": "seed of the pair sampling and probe split"})
    control: str = field(default="none", metadata={
        "choices": CONTROLS,
        "help": "random-init: a seeded random initialisation (needs its own --out)"})
    control_seed: int = field(default=0, metadata={"type": "seed",
                                                   "help": "seed of --control random-init"})

    def _check(self) -> None:
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
class FitConfig(TakesTraceSettings):
    """Settings of a `fit` run.

    Attributes:
        max_tokens: Per trace, at most this many trajectory tokens in (a) (random subsample).
        layers: Layers to fit (None: all).
        random_init_control: Also fit a random-init model of the same architecture.
        seed: Seed of the subsample, the random-init model and the bootstrap.
        n_boot: Bootstrap resamples of traces for (b)'s CIs.
        nll: Also run (b').
    """

    max_tokens: int | None = field(default=None, metadata={
        "type": "positive_int", "help": "(a): at most N random trajectory tokens per trace"})
    layers: tuple[int, ...] | None = field(default=None, metadata={
        "type": "nonnegative_int", "nargs": "+", "help": "layers (default: all)"})
    random_init_control: bool = field(default=False, metadata={
        "help": "repeat the fits on a seeded random-init model of the same architecture"})
    seed: int = field(default=0, metadata={
        "type": "seed", "help": "seed of subsampling, random init, bootstrap"})
    n_boot: int = field(default=1000, metadata={"type": "positive_int",
                                                "help": "bootstrap resamples"})
    nll: bool = field(default=True, metadata={
        "flag": "--no-nll", "action": "store_false", "help": "skip the static-patch answer NLL"})

    def _check(self) -> None:
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

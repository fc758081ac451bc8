"""The registry of stored per-trace arrays: every array a command writes into a trace group is
declared here once, with its axes, dtype, units and sign, meaning, writer and method note.

The write loop refuses an undeclared name (`check_declared`), `compare` and `inspect` take names,
order and signs from here, and the array table of `cache/SCHEMA.md` is generated from it
(`markdown_table`; a test keeps the two equal). Axes: T = trajectory tokens (index i = trajectory
token i, position `spans["trajectory"][0] + i`), L = the stored layers (attribute `upd_layers`),
n_tokens = every token of the trace.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from probes.errors import ProbesError

METHODS = "docs/methods.md"
"""The project's method notes; `ArrayDecl.doc` is an anchor in it."""


@dataclass(frozen=True)
class ArrayDecl:
    """One stored per-trace array.

    Attributes:
        name: Dataset name in the trace group.
        axes: Shape in axis names, e.g. "[L, T]".
        dtype: Stored dtype.
        writer: The command that writes it ("any" = every command that creates a trace group).
        meaning: What one value is.
        units: Units and sign convention ("" when dimensionless and unsigned).
        doc: Anchor in `METHODS`.
        by_magnitude: A signed loss change that `compare` compares by its magnitude |x| (large =
            either sign).
    """

    name: str
    axes: str
    dtype: str
    writer: str
    meaning: str
    units: str = ""
    doc: str = ""
    by_magnitude: bool = False

    @property
    def link(self) -> str:
        """`docs/methods.md#anchor`."""
        return f"{METHODS}#{self.doc}" if self.doc else METHODS


LABELS: tuple[ArrayDecl, ...] = (
    ArrayDecl("phrase_id", "[n_tokens]", "int16", "any",
              "lexicon phrase id of each token, -1 none", doc="labels"),
    ArrayDecl("phrase_first", "[n_tokens]", "uint8", "any",
              "1 on the first token of a phrase occurrence", doc="labels"),
    ArrayDecl("paragraph_start", "[T]", "uint8", "any",
              "trajectory token starts a blank-line paragraph", doc="labels"),
    ArrayDecl("raml_notebook_occurrences", "[n, 3]", "int32", "any",
              "RaML notebook word matches (start, end, word index)", doc="labels"),
)
"""Written with every new trace group (`probes.traces.labels`)."""

LHAT: tuple[ArrayDecl, ...] = (
    ArrayDecl("lhat", "[T+1]", "float32", "lhat",
              "answer NLL after each trajectory prefix (index t = t tokens)",
              "nats per answer token", doc="m8"),
    ArrayDecl("lhat_delta", "[T]", "float32", "lhat", "ΔL̂ of each token: L̂_{i+1} − L̂_i",
              "nats; < 0 = the token lowers the answer loss", doc="m8"),
    ArrayDecl("lhat_rho", "[T]", "float32", "lhat",
              "RaML's relative change ρ = |L̂_{i+1} − L̂_i| / L̂_i (NaN where L̂_i = 0)",
              "ratio ≥ 0", doc="m8"),
    ArrayDecl("lhat_log_ratio", "[T]", "float32", "lhat", "log-ratio log L̂_{i+1} − log L̂_i",
              "log ratio; < 0 = falling", doc="m8"),
)
"""Written by `lhat` (`probes.measures.lhat.lhat_arrays`)."""

UPDATES: tuple[ArrayDecl, ...] = (
    ArrayDecl("upd_contrib", "[L, T]", "float32", "updates",
              "M2 ‖Σ_h p W_O^h v_t‖ at q: the token's summed-head attention contribution",
              "residual norm", doc="m2"),
    ArrayDecl("upd_loo", "[L, T]", "float32", "updates",
              "M4 ‖Σ_h W_O^h δz_{h,t}‖: leave-one-out change of the context vector",
              "residual norm", doc="m4"),
    ArrayDecl("upd_mass", "[L, T]", "float32", "updates",
              "M1 attention mass, mean over query heads", "probability in [0, 1]", doc="m1"),
    ArrayDecl("upd_dai_fro", "[L, T]", "float32", "updates",
              "M3 Dai update ‖v_t‖‖k̃_t‖, summed over KV heads", "Frobenius norm", doc="m3"),
    ArrayDecl("upd_sigma_gate", "[L, T]", "float32", "updates",
              "M5 Dherin step size σ_i = ‖step_i‖_F on W_gate (γ unfolded)", "Frobenius norm",
              doc="m5"),
    ArrayDecl("upd_sigma_up", "[L, T]", "float32", "updates",
              "M5 Dherin step size σ_i = ‖step_i‖_F on W_up (γ unfolded)", "Frobenius norm",
              doc="m5"),
    ArrayDecl("upd_cos_gate", "[L, T]", "float32", "updates",
              "M5 cos(step_i, step_{i−1}) on W_gate (NaN at i = 0)", "cosine in [−1, 1]",
              doc="m5"),
    ArrayDecl("upd_align_cos", "[L, T]", "float32", "updates",
              "M6 cos(step_i, −∇L) of the joint gate⊕up step at q",
              "cosine; > 0 = a descent direction", doc="m6"),
    ArrayDecl("upd_dl_pred", "[L, T]", "float32", "updates",
              "M6 first-order ΔL^pred = ⟨∇L, step_i⟩ (joint) at q",
              "nats; < 0 = the step as a weight edit lowers L", doc="m6",
              by_magnitude=True),
    ArrayDecl("upd_m7", "[L, T]", "float32", "updates",
              "M7 first-order ΔL of removing token t through layer ℓ's attention, summed over "
              "all answer rows", "nats; > 0 = the token helps (removing it raises L)", doc="m7",
              by_magnitude=True),
)
"""Written by `updates` (`probes.measures.shared_pass`), in this order; the last marks a trace done."""

LANDSCAPE: tuple[ArrayDecl, ...] = (
)
"""Written by `landscape` (the loss plane and the implicit-update path)."""

EFFICIENCY: tuple[ArrayDecl, ...] = (
)
"""Written by the trajectory-efficiency and model-comparison commands."""

ANCHORS: tuple[ArrayDecl, ...] = (
)
"""Written by `anchors` (sentence units, receiver heads, suppression, resampling)."""

EFFECTS: tuple[ArrayDecl, ...] = (
)
"""Written by `effects` (behaviour directions, causal edits of single tokens' updates)."""

REGISTRY: tuple[ArrayDecl, ...] = (*LABELS, *LHAT, *UPDATES, *LANDSCAPE, *EFFICIENCY, *ANCHORS,
                                   *EFFECTS)
"""Every stored per-trace array."""

BY_NAME: dict[str, ArrayDecl] = {a.name: a for a in REGISTRY}


def names(group: Iterable[ArrayDecl]) -> tuple[str, ...]:
    """The names of a group of declarations, in order."""
    return tuple(a.name for a in group)


def check_declared(arrays: Iterable[str], writer: str) -> None:
    """Refuse to store an array that the registry does not declare for `writer`.

    Raises:
        ProbesError: Naming the array (a programming error in a command, caught before writing).
    """
    for name in arrays:
        decl = BY_NAME.get(name)
        if decl is None or decl.writer not in (writer, "any"):
            raise ProbesError(
                f"{writer} tried to store {name!r}, which probes/arrays.py does not declare for "
                f"it; declare every stored array in the registry first"
            )


def markdown_table() -> str:
    """The registry as the Markdown table of `cache/SCHEMA.md` (one row per array)."""
    lines = ["| array | dtype, shape | written by | meaning | units, sign | method |",
             "|---|---|---|---|---|---|"]
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    for a in REGISTRY:
        writer = "every writing command" if a.writer == "any" else f"`{a.writer}`"
        lines.append(f"| `{a.name}` | {a.dtype} {a.axes} | {writer} | {cell(a.meaning)} | "
                     f"{cell(a.units) or '—'} | [{a.doc}](../{a.link}) |")
    return "\n".join(lines)

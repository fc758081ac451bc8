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
"""Written by `lhat` (`probes.measures.lhat.fast.lhat_arrays`)."""

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
"""Written by `updates` (`probes.measures.updates.shared_pass`), in this order; the last marks a trace
done."""

LANDSCAPE: tuple[ArrayDecl, ...] = (
    ArrayDecl("land_grid", "[n, n]", "float32", "landscape",
              "trajectory-free answer NLL at θ + xδ₁ + yδ₂ on the random plane (row = y, column = "
              "x; axes linspace(−land_range, land_range, land_grid_n), trace attributes)",
              "nats per answer token",
              doc="landscape"),
    ArrayDecl("land_path", "[T+1, 2]", "float32", "landscape",
              "implicit-update path (row-mean Dherin MLP patches ΔW̄_t, t = no trajectory..T) "
              "projected onto the random plane", "plane coordinates (units of δ₁, δ₂)",
              doc="landscape"),
    ArrayDecl("land_path_nll", "[T+1]", "float32", "landscape",
              "trajectory-free answer NLL with the exact per-row Dherin patches of prefix t "
              "(index 0 = origin, index T = full-context NLL; positions kept)",
              "nats per answer token", doc="landscape"),
    ArrayDecl("land_path_norm", "[T+1]", "float32", "landscape",
              "‖ΔW̄_t‖_F of the shared (row-mean) path", "Frobenius norm", doc="landscape"),
    ArrayDecl("land_pca_axes", "[2, n]", "float32", "landscape",
              "x and y coordinates of the path-plane grid", "plane coordinates (unit directions)",
              doc="landscape"),
    ArrayDecl("land_pca_path", "[T+1, 2]", "float32", "landscape",
              "the path on its own plane (top-2 principal directions of {ΔW̄_t})",
              "plane coordinates (unit directions)", doc="landscape"),
    ArrayDecl("land_pca_grid", "[n, n]", "float32", "landscape",
              "trajectory-free answer NLL on the path plane (row = y, column = x)",
              "nats per answer token", doc="landscape"),
)
"""Written by `landscape` (the loss plane and the implicit-update path)."""

EFFICIENCY: tuple[ArrayDecl, ...] = (
)
"""Written by the trajectory-efficiency and model-comparison commands."""

ANCHORS: tuple[ArrayDecl, ...] = (
    ArrayDecl("chunk_spans", "[C, 2]", "int32", "anchors",
              "trajectory token range [start, end) of each chunk (sentence unit; C = chunks)",
              doc="chunks"),
    ArrayDecl("chunk_category", "[C]", "uint8", "anchors",
              "category code of each chunk: the lexicon category of the phrase it opens with",
              doc="chunks"),
    ArrayDecl("anc_vertical", "[L, H, C]", "float32", "anchors",
              "vertical score of each chunk per layer and head: mean sentence-averaged attention "
              "it receives from chunks at least 4 later (NaN: none)",
              "probability in [0, 1]", doc="receiver-heads"),
    ArrayDecl("anc_kurtosis", "[L, H]", "float32", "anchors",
              "Fisher kurtosis of each head's vertical scores over the chunks", doc="receiver-heads"),
    ArrayDecl("anc_supp_kl", "[C, C]", "float32", "anchors",
              "[j, i]: mean over chunk j's tokens of KL(P_base || P with chunk i's keys masked) "
              "(NaN for j <= i)", "nats >= 0", doc="suppression"),
    ArrayDecl("anc_supp_dl", "[C]", "float32", "anchors",
              "answer NLL with chunk i's keys masked in all heads of all layers minus without",
              "nats per answer token; > 0 = the answer needs the chunk", doc="suppression",
              by_magnitude=True),
    ArrayDecl("anc_forced", "[C]", "float32", "anchors",
              "forced-answer importance: L-hat after the chunk minus L-hat before it",
              "nats per answer token; < 0 = the chunk lowers the answer loss", doc="resampling",
              by_magnitude=True),
    ArrayDecl("anc_rs_acc", "[C+1]", "float32", "anchors",
              "accuracy of the K continuations sampled from the prefix before chunk i (i = C: "
              "after the whole trajectory)", "fraction in [0, 1]", doc="resampling"),
    ArrayDecl("anc_rs_importance", "[C]", "float32", "anchors",
              "resampling importance acc[i+1] - acc[i]", "fraction; > 0 = keeping the chunk helps",
              doc="resampling"),
    ArrayDecl("anc_rs_ci_acc", "[C]", "float32", "anchors",
              "counterfactual importance: accuracy of dissimilar resamples at i minus accuracy at "
              "i+1 (NaN: none dissimilar)", "fraction; < 0 = the chunk helps", doc="resampling"),
    ArrayDecl("anc_rs_ci_kl", "[C]", "float32", "anchors",
              "counterfactual importance: KL(answers of dissimilar resamples || reference)",
              "nats >= 0", doc="resampling"),
    ArrayDecl("anc_rs_n_dissimilar", "[C]", "int16", "anchors",
              "resamples at i whose first chunk the similarity filter kept as dissimilar",
              "count", doc="resampling"),
)
"""Written by `anchors` (sentence units, receiver heads, suppression, resampling)."""

EFFECTS: tuple[ArrayDecl, ...] = (
    ArrayDecl("eff_pairs", "[n, 2]", "int32", "effects",
              "sampled (layer ℓ, trajectory index t) pairs of the causal edits, stratified by "
              "category", doc="effects"),
    ArrayDecl("eff_pred_m7", "[n]", "float32", "effects",
              "M7's first-order ΔL of the attention knockout of each pair (= upd_m7[ℓ, t])",
              "nats; > 0 = removing the token raises L", doc="effects", by_magnitude=True),
    ArrayDecl("eff_pred_m6", "[n]", "float32", "effects",
              "M6's first-order ΔL of removing each pair's MLP step (= −upd_dl_pred[ℓ, t])",
              "nats; > 0 = removing the step raises L", doc="effects", by_magnitude=True),
    ArrayDecl("dir_proj", "[C, L, T]", "float32", "effects",
              "projection û^c_ℓ · resid_post of each token on the unit behaviour direction of "
              "category c (C = reflection, delimiter)", "residual units", doc="directions"),
    ArrayDecl("dir_cos", "[C, L, T]", "float32", "effects",
              "cos(M4 δ^ℓ_{q,t} at the first answer row, u^c_ℓ): the token's implicit residual "
              "patch vs the behaviour direction", "cosine in [−1, 1]", doc="directions"),
    ArrayDecl("eff_dl_attn", "[n]", "float32", "effects",
              "real ΔL of masking key t for the answer rows in layer ℓ only (run to the loss)",
              "nats; > 0 = removing the token raises L", doc="effects", by_magnitude=True),
    ArrayDecl("eff_dl_mlp", "[n]", "float32", "effects",
              "real ΔL of subtracting token t's rank-1 MLP step from W_gate, W_up of layer ℓ",
              "nats; > 0 = removing the step raises L", doc="effects", by_magnitude=True),
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

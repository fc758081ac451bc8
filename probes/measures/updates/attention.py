"""Per-token attention "updates" at answer query positions (docs/methods.md#m1 .. #m4).

For one query position `q` (e.g. the position predicting the first answer token) and every key
`t ≤ q`, per layer ℓ and query head h, from ONE bridge forward with hooks:
* M1 `mass` = p_{h,t}: the pattern row of q.
* M2 `contrib_norm` = ‖c_{h,t}‖ with c_{h,t} = p_{h,t} W_O^h v_{g(h),t} (exact decomposition of
  attn_out at q: Σ_{h,t} c_{h,t} + b_O = attn_out_q); `contrib_sum_norm` = ‖Σ_h c_{h,t}‖.
* M4 `loo_norm` = ‖δz_{h,t}‖ with δz = p (v_t − z)/(1 − p) = z − z^{(∖t)} (leave-one-out of key t
  from head h's softmax at row q); `loo_out_norm` = ‖W_O^h δz_{h,t}‖ and `loo_sum_norm` =
  ‖Σ_h W_O^h δz_{h,t}‖ (the residual-space context vector δ^ℓ_{q,t}).
* M3 (Dai dual form, relaxed linear attention) with RoPE-rotated keys/queries k̃, q̃ as the softmax
  sees them: ΔW_{g,t} = v_{g,t} k̃_{g,t}ᵀ (d_h × d_h, never materialised). Following §7.3 M3 the
  update itself is UNSCALED (`dai_fro` = ‖v_t‖‖k̃_t‖, per KV head, shape [L, H_kv, T], shared by
  the G query heads of the group), and its action on the query is reported both unscaled
  (`dai_action_norm` = ‖v_t‖ |k̃_t·q̃_h|) and with the softmax temperature 1/√d_h
  (`dai_scaled_action_norm` = ‖v_t‖ |s_{h,t}|, s the pre-softmax score). Agreement diagnostics
  between the relaxed-linear and the softmax outputs (§7.3 M3 names a Spearman correlation over t
  between v_t (k̃_t·q̃)/√d_h and p_t v_t, which are vectors; we make it concrete as):
  `dai_spearman[ℓ, h]` = Spearman over t of ‖v_t‖·s_{h,t} (signed relaxed weight) vs ‖v_t‖·p_{h,t}
  (i.e. of the per-token contributions' signed sizes), and `dai_cos[ℓ, h]` = cos(Σ_t v_t s_{h,t},
  z_h) (direction of the relaxed-linear output vs the real softmax output; scale-free, so the
  softmax normaliser does not matter).

GQA: query head h reads KV head g(h) = h // (H / H_kv). Values are taken from `attn.v` as the
bridge computes them (raw HF weights, b_V included: Dai's ‖v‖ is NOT invariant to b_V, LOO is).
Key axis: all keys 0..q inclusive (the last one is q itself), so the sums are exact; slice
`[..., :q]` for the strict "t < q" keys. The families of `probes.measures.updates.families.UPDATE_FAMILIES`
(the Llama layout, GPT-2 with its unrotated q/k, Phi-3 on the "sdpa" path only) are supported.

Several query rows (e.g. every answer row 𝒬) from the same ONE forward: `capture_query_rows` /
`query_rows_capture` take the keys and values once and rot_q / z / the pattern row / attn_out per
row (`QueryRowsCapture`, `.row(i)` = the single-row `QueryCapture`); `token_updates_rows` /
`token_updates_from` on it give one `TokenUpdates` per row (W_O^h v_t shared by the rows), and
`probes.measures.updates.attention_rows.key_summary_from` only the head-aggregated quantities `updates`
stores, for chosen keys (`KeySummary`, [L, R, T]).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Float32, Float64, Int
from torch import Tensor

from hooks import capture
from hooks.model import LoadedModel
from probes.errors import ProbesError
from probes.measures.updates.captures import QueryCapture, QueryRowsCapture
from probes.measures.updates.families import check_family, qk_sites, views
from probes.measures.updates.sdpa_pass import ATTENTION_PATHS, sdpa_query_rows_capture, sdpa_view

__all__ = [
    "QueryCapture",
    "QueryRowsCapture",
    "TokenUpdates",
    "UpdatesError",
    "capture_query",
    "capture_query_rows",
    "check_query",
    "check_query_rows",
    "layer_terms",
    "o_proj_weights",
    "query_capture",
    "query_rows_capture",
    "token_updates",
    "token_updates_from",
    "token_updates_rows",
]


class UpdatesError(ProbesError, ValueError):
    """Unsupported model or bad query position for `token_updates`."""


@dataclass
class TokenUpdates:
    """Per-token attention quantities at one query position (float32 numpy arrays).

    Shapes: L = n_layers, H = n_heads, H_kv = n_kv_heads, T = q + 1 keys (0..q inclusive).

    Attributes:
        query: The query position q.
        keys: Key positions [T] (= arange(q + 1)).
        mass: M1 attention mass p [L, H, T] (sums to 1 over T).
        contrib_norm: M2 ‖p W_O^h v_t‖ [L, H, T].
        contrib_sum_norm: M2 ‖Σ_h p W_O^h v_t‖ [L, T].
        loo_norm: M4 ‖δz_{h,t}‖ [L, H, T] (d_h space).
        loo_out_norm: M4 ‖W_O^h δz_{h,t}‖ [L, H, T].
        loo_sum_norm: M4 ‖Σ_h W_O^h δz_{h,t}‖ [L, T] (residual-space context vector).
        dai_fro: M3 ‖v_t k̃_tᵀ‖_F = ‖v_t‖‖k̃_t‖ [L, H_kv, T] (unscaled, per KV head).
        dai_action_norm: M3 ‖v_t (k̃_t·q̃_h)‖ [L, H, T] (unscaled).
        dai_scaled_action_norm: M3 the same times 1/√d_h (= ‖v_t‖ |s_{h,t}|) [L, H, T].
        dai_action_out_norm: M3 ‖W_O^h v_t‖ |s_{h,t}| [L, H, T] (scaled action in the residual).
        dai_spearman: Spearman over t of ‖v_t‖ s_{h,t} vs ‖v_t‖ p_{h,t} [L, H].
        dai_cos: cos(Σ_t v_t s_{h,t}, z_h) [L, H].
        score: Pre-softmax scores q̃·k̃ · scale [L, H, T] as the model's softmax sees them
            (soft-capped, c·tanh(s/c), where the model caps them: Gemma-2; the M3 quantities use
            the uncapped s = q̃·k̃ · scale of relaxed linear attention).
        scale: The model's score scale (1/√d_h; Gemma: query_pre_attn_scalar^-1/2).
        gqa_group: G = H / H_kv.
    """

    query: int
    keys: Int[np.ndarray, " t"]
    mass: Float32[np.ndarray, "l h t"]
    contrib_norm: Float32[np.ndarray, "l h t"]
    contrib_sum_norm: Float32[np.ndarray, "l t"]
    loo_norm: Float32[np.ndarray, "l h t"]
    loo_out_norm: Float32[np.ndarray, "l h t"]
    loo_sum_norm: Float32[np.ndarray, "l t"]
    dai_fro: Float32[np.ndarray, "l h_kv t"]
    dai_action_norm: Float32[np.ndarray, "l h t"]
    dai_scaled_action_norm: Float32[np.ndarray, "l h t"]
    dai_action_out_norm: Float32[np.ndarray, "l h t"]
    dai_spearman: Float32[np.ndarray, "l h"]
    dai_cos: Float32[np.ndarray, "l h"]
    score: Float32[np.ndarray, "l h t"]
    scale: float
    gqa_group: int

    def dai_fro_per_query_head(self) -> Float32[np.ndarray, "l h t"]:
        """`dai_fro` repeated over each GQA group: [L, H, T] (do not sum it over heads)."""
        return np.repeat(self.dai_fro, self.gqa_group, axis=1)


def o_proj_weights(loaded: LoadedModel
                   ) -> list[tuple[Float[Tensor, "d_model hd"], Float[Tensor, " d_model"] | None]]:
    """The output projection of every layer, from the weight views (`hooks.weights`).

    Args:
        loaded: A booted model of a family in `probes.measures.updates.families.UPDATE_FAMILIES`.

    Returns:
        Per layer `(W, b)`: W [d_model, H·d_h] (y = z Wᵀ + b; GPT-2's Conv1D `c_proj` transposed),
        b or None.

    Raises:
        UpdatesError: For a family the update measurements do not handle.
    """
    layers = views(loaded, what="token_updates", error=UpdatesError)
    return [(layer.w_o, layer.b_o) for layer in layers]


def _ranks(x: Tensor) -> Tensor:
    """Ranks along the last axis (0-based; ties broken by order, fine for float data)."""
    return x.argsort(dim=-1).argsort(dim=-1).to(torch.float64)


def _spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman correlation along the last axis (NaN where one side is constant)."""
    ra, rb = _ranks(a), _ranks(b)
    ra = ra - ra.mean(-1, keepdim=True)
    rb = rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1))


def check_query(loaded: LoadedModel, n_tokens: int, query: int) -> None:
    """Raise `UpdatesError` unless the family is supported (`probes.measures.updates.families`) and
    0 <= query < n_tokens."""
    check_family(loaded, what="token_updates", error=UpdatesError)
    if not 0 <= query < n_tokens:
        raise UpdatesError(f"query={query} is outside the sequence of {n_tokens} tokens.")


def check_query_rows(loaded: LoadedModel, n_tokens: int, rows: Sequence[int]) -> list[int]:
    """`check_query` for several rows; they must also be strictly increasing.

    Returns:
        The rows as a list of ints.

    Raises:
        UpdatesError: For an unsupported family, no rows, rows not strictly increasing or out of
            range.
    """
    rows = [int(r) for r in rows]
    if not rows or rows != sorted(set(rows)):
        raise UpdatesError(f"query rows must be strictly increasing and non-empty; got {rows}.")
    for r in (rows[0], rows[-1]):
        check_query(loaded, n_tokens, r)
    return rows


@contextmanager
def query_rows_capture(loaded: LoadedModel, rows: Sequence[int], *,
                       device: str | torch.device | None = "cpu",
                       ) -> Iterator[Callable[[], QueryRowsCapture]]:
    """Hook the bridge for what M1–M4 need at several query rows; the forward runs inside.

    Keys and values are captured once (keys 0..max(rows)); rot_q, z, the pattern row and attn_out
    once per row. As `query_capture`, any bridge forward inside the block is recorded (also one
    started through `loaded.hf_model`, with or without grad); call the yielded function after it.

        >>> with query_rows_capture(loaded, [q0, q1, q2]) as get:
        ...     loaded.bridge(ids)
        >>> cap = get()                        # cap.row(1) is the QueryCapture of q1

    Args:
        loaded: A booted model of a supported family (check with `check_query_rows`).
        rows: Strictly increasing query rows.
        device: Where the captured tensors go ("cpu"; None = the model's device).

    Yields:
        `get() -> QueryRowsCapture`.
    """
    rows = [int(r) for r in rows]
    check_family(loaded, what="the eager capture", error=UpdatesError, attention="eager")
    L, last = loaded.arch.n_layers, rows[-1]
    q_site, k_site = qk_sites(loaded)                 # rotated (RoPE) or as projected (GPT-2)
    kv_sites = [f"L{l}.{c}" for l in range(L) for c in (k_site, "attn.v")]
    q_sites = [f"L{l}.{c}" for l in range(L) for c in (q_site, "attn.z", "attn.pattern", "attn_out")]
    with (
        capture(loaded, kv_sites, positions=slice(0, last + 1), dtype="float32",
                device=device) as kv_store,
        capture(loaded, q_sites, positions=rows, dtype="float32", device=device) as q_store,
    ):
        def get() -> QueryRowsCapture:
            kv, qs = kv_store.result(), q_store.result()
            return QueryRowsCapture(
                rows=rows,
                rot_k=[kv[f"L{l}.{k_site}"] for l in range(L)],
                v=[kv[f"L{l}.attn.v"] for l in range(L)],
                rot_q=[qs[f"L{l}.{q_site}"] for l in range(L)],
                z=[qs[f"L{l}.attn.z"] for l in range(L)],
                pattern=[qs[f"L{l}.attn.pattern"][:, :, : last + 1] for l in range(L)],
                attn_out=[qs[f"L{l}.attn_out"] for l in range(L)],
            )

        yield get


@contextmanager
def query_capture(loaded: LoadedModel, query: int, *, device: str | torch.device | None = "cpu",
                  ) -> Iterator[Callable[[], QueryCapture]]:
    """Hook the bridge for what M1–M4 need at `query`; the forward runs inside the block.

    For sharing one forward with other measurements (e.g. `probes.updates_run`): a bridge forward
    inside the block (also one started through `loaded.hf_model`, with or without grad) is
    recorded; call the yielded function after it. The one-row case of `query_rows_capture`.

        >>> with query_capture(loaded, q) as get:
        ...     loaded.bridge(ids)
        >>> cap = get()

    Args:
        loaded: A booted model of a supported family (check with `check_query`).
        query: Query position q.
        device: Where the captured tensors go ("cpu"; None = the model's device, so that
            `token_updates_from` computes there).

    Yields:
        `get() -> QueryCapture`.
    """
    with query_rows_capture(loaded, [query], device=device) as get:
        yield lambda: get().row(0)


@torch.no_grad()
def capture_query(loaded: LoadedModel, ids: Int[Tensor, "1 n"] | Int[Tensor, " n"], query: int,
                  *, attention: str = "eager") -> QueryCapture:
    """Run the bridge once with hooks and keep what M1–M4 need for query position `query`.

    Args:
        loaded: A booted model of a supported family (`probes.measures.updates.families`).
        ids: Token ids [1, N] (or [N]); batch 1.
        query: Query position q, 0 <= q < N.
        attention: "eager" (the bridge, the reference) or "sdpa" (the linear-memory pass:
            `probes.measures.updates.sdpa_pass.sdpa_query_rows_capture`).

    Returns:
        The captured tensors (keys 0..q, query row q).

    Raises:
        UpdatesError: For an unsupported family or a query out of range.
    """
    ids = ids.reshape(1, -1) if ids.dim() == 1 else ids
    check_query(loaded, int(ids.shape[1]), query)
    if attention != "eager":
        return capture_query_rows(loaded, ids, [query], attention=attention).row(0)
    with query_capture(loaded, query) as get:
        loaded.bridge(ids.to(loaded.device))
    return get()


@torch.no_grad()
def capture_query_rows(loaded: LoadedModel, ids: Int[Tensor, "1 n"] | Int[Tensor, " n"],
                       rows: Sequence[int], *, attention: str = "eager") -> QueryRowsCapture:
    """Run the bridge once with hooks and keep what M1–M4 need at several query rows.

    Args:
        loaded: A booted model of a supported family (`probes.measures.updates.families`).
        ids: Token ids [1, N] (or [N]); batch 1.
        rows: Strictly increasing query rows, each in [0, N).
        attention: "eager" (the bridge's explicit pattern, the reference) or "sdpa" (the
            linear-memory pass: a fused-attention forward of a plain-HF view, the pattern rows
            recomputed exactly from the captured q̃, k̃; `probes.measures.updates.sdpa_pass`).

    Returns:
        The captured tensors (keys 0..max(rows) once, the query side per row).

    Raises:
        UpdatesError: For an unsupported family or bad rows.
    """
    ids = ids.reshape(1, -1) if ids.dim() == 1 else ids
    rows = check_query_rows(loaded, int(ids.shape[1]), rows)
    _check_attention(attention)
    if attention == "sdpa":
        view = sdpa_view(loaded)
        with sdpa_query_rows_capture(view, rows) as get:
            view(ids.to(loaded.device), logits_to_keep=1)
        return get()
    with query_rows_capture(loaded, rows) as get:
        loaded.bridge(ids.to(loaded.device))
    return get()


def _check_attention(attention: str) -> None:
    if attention not in ATTENTION_PATHS:
        raise UpdatesError(f"attention must be one of {', '.join(ATTENTION_PATHS)}; got "
                           f"{attention!r}.")


def layer_terms(cap: QueryCapture, layer: int, w_o: Float[Tensor, "d_model hd"],
                scale: float | None = None) -> dict[str, Float64[Tensor, "*shape"]]:
    """The exact per-token vectors of one layer in float64 (transient [H, T, d] tensors), on the
    capture's device.

    Args:
        cap: Output of `capture_query`.
        layer: Layer index.
        w_o: That layer's `o_proj.weight` [d_model, H·d_h].
        scale: The score scale of `relaxed` (default 1/√d_h; the model's own, e.g. Gemma's
            query_pre_attn_scalar^-1/2, from `token_updates_from`).

    Returns:
        Dict with `p` [H, T], `v_h` / `k_h` [H, T, d_h] (KV heads expanded with g(h) = h // G),
        `q` / `z` [H, d_h], `wv` = W_O^h v_t [H, T, d], `c` = p W_O^h v_t [H, T, d],
        `dz` = p (v_t − z)/(1 − p) [H, T, d_h], `dz_out` = W_O^h δz [H, T, d],
        `dots` = k̃_t·q̃_h [H, T], `relaxed` = Σ_t v_t (k̃_t·q̃_h) · scale [H, d_h].
    """
    f64 = torch.float64
    k = cap.rot_k[layer].to(f64)                          # [T, H_kv, d_h]
    v = cap.v[layer].to(f64)
    q = cap.rot_q[layer].to(f64)                          # [H, d_h]
    z = cap.z[layer].to(f64)
    p = cap.pattern[layer].to(f64)                        # [H, T]
    H, d_h = q.shape
    G = H // k.shape[1]
    w = w_o.detach().to(k.device, f64).reshape(-1, H, d_h)  # [d, H, d_h]
    v_h = v.repeat_interleave(G, dim=1).transpose(0, 1)   # [H, T, d_h]
    k_h = k.repeat_interleave(G, dim=1).transpose(0, 1)
    wv = torch.einsum("dhe,hte->htd", w, v_h)
    dz = p[..., None] * (v_h - z[:, None, :]) / (1.0 - p)[..., None]
    dots = torch.einsum("hte,he->ht", k_h, q)
    return {
        "p": p, "v_h": v_h, "k_h": k_h, "q": q, "z": z, "wv": wv,
        "c": p[..., None] * wv, "dz": dz, "dz_out": torch.einsum("dhe,hte->htd", w, dz),
        "dots": dots, "relaxed": torch.einsum("ht,hte->he", dots * (
            d_h**-0.5 if scale is None else scale), v_h),
        "kv_fro": (v.norm(dim=-1) * k.norm(dim=-1)).T,    # [H_kv, T]
    }


def token_updates(loaded: LoadedModel, ids: Int[Tensor, "1 n"] | Int[Tensor, " n"], query: int,
                  *, attention: str = "eager") -> TokenUpdates:
    """Compute M1–M4 for one query position from one hooked bridge forward.

    Example:
        >>> upd = token_updates(loaded, ids, query=ids.shape[1] - 1)
        >>> upd.mass.shape                     # [n_layers, n_heads, query + 1]

    Args:
        loaded: A booted model of a supported family (`probes.measures.updates.families`), batch 1.
        ids: Token ids [1, N] (or [N]).
        query: Query position q, 0 <= q < N (keys are 0..q).
        attention: "eager" (the bridge, the reference) or "sdpa" (linear memory; see
            `capture_query_rows`).

    Returns:
        The per-token quantities (float32; computed in float64 from the captured fp32 tensors).

    Raises:
        UpdatesError: For an unsupported family or a query out of range.
    """
    weights = o_proj_weights(loaded)
    cap = capture_query(loaded, ids, query, attention=attention)
    return token_updates_from(loaded, cap, weights)


def token_updates_rows(loaded: LoadedModel, ids: Int[Tensor, "1 n"] | Int[Tensor, " n"],
                       rows: Sequence[int], *, attention: str = "eager") -> list[TokenUpdates]:
    """M1–M4 at several query rows from ONE hooked bridge forward.

    Example:
        >>> ups = token_updates_rows(loaded, ids, rows=[q0, q0 + 1, q0 + 2])
        >>> ups[1].mass.shape                  # [n_layers, n_heads, q0 + 2]

    Args:
        loaded: A booted model of a supported family (`probes.measures.updates.families`), batch 1.
        ids: Token ids [1, N] (or [N]).
        rows: Strictly increasing query rows, each in [0, N).
        attention: "eager" or "sdpa" (see `capture_query_rows`).

    Returns:
        One `TokenUpdates` per row, equal (to float rounding) to `token_updates(loaded, ids, q)`.

    Raises:
        UpdatesError: For an unsupported family or bad rows.
    """
    weights = o_proj_weights(loaded)
    cap = capture_query_rows(loaded, ids, rows, attention=attention)
    return token_updates_from(loaded, cap, weights)


def _updates_from_terms(terms: list[dict[str, Tensor]], query: int, scale: float, gqa_group: int,
                        ) -> TokenUpdates:
    """Stack per-layer `_layer_quantities` dicts into a `TokenUpdates` (float32 numpy)."""
    arrays = {k: torch.stack([t[k] for t in terms]).to(torch.float32).cpu().numpy()
              for k in terms[0]}
    return TokenUpdates(query=query, keys=np.arange(query + 1), scale=scale, gqa_group=gqa_group,
                        **arrays)


def token_updates_from(loaded: LoadedModel, cap: QueryCapture | QueryRowsCapture,
                       weights: list[tuple[Float[Tensor, "d_model hd"],
                                           Float[Tensor, " d_model"] | None]] | None = None,
                       ) -> TokenUpdates | list[TokenUpdates]:
    """M1–M4 from an existing capture (no forward).

    Args:
        loaded: The model the capture came from (architecture and o_proj weights).
        cap: A `capture_query` / `query_capture` capture, or a `capture_query_rows` /
            `query_rows_capture` one (computed on its device).
        weights: `o_proj_weights(loaded)`, or None to read them now.

    Returns:
        For a `QueryCapture`: the per-token quantities (float32), as `token_updates`. For a
        `QueryRowsCapture`: one `TokenUpdates` per row (the key-side products W_O^h v_t and norms
        are computed once per layer and shared by the rows; equal to separate single-row results
        to float rounding).
    """
    weights = o_proj_weights(loaded) if weights is None else weights
    view = views(loaded, what="token_updates", error=UpdatesError)[0]
    scale, cap_c = float(view.attn_scale), view.attn_softcap
    if isinstance(cap, QueryRowsCapture):
        per_row: list[list[dict[str, Tensor]]] = [[] for _ in cap.rows]
        for l in range(loaded.arch.n_layers):
            shared = _shared_key_terms(cap, l, weights[l][0])
            for i in range(len(cap.rows)):
                per_row[i].append(_row_quantities(cap, shared, l, i, scale, cap_c))
            del shared
        return [_updates_from_terms(terms, q, scale, loaded.arch.gqa_group)
                for q, terms in zip(cap.rows, per_row)]
    query = cap.query
    out: dict[str, list[Tensor]] = {k: [] for k in (
        "mass", "contrib_norm", "contrib_sum_norm", "loo_norm", "loo_out_norm", "loo_sum_norm",
        "dai_fro", "dai_action_norm", "dai_scaled_action_norm", "dai_action_out_norm",
        "dai_spearman", "dai_cos", "score")}
    for l in range(loaded.arch.n_layers):
        t = layer_terms(cap, l, weights[l][0], scale)
        p, s = t["p"], t["dots"] * scale                  # linear (Dai's relaxed attention)
        v_norm = t["v_h"].norm(dim=-1)                    # [H, T]
        out["mass"].append(p)
        out["contrib_norm"].append(t["c"].norm(dim=-1))
        out["contrib_sum_norm"].append(t["c"].sum(0).norm(dim=-1))
        out["loo_norm"].append(t["dz"].norm(dim=-1))
        out["loo_out_norm"].append(t["dz_out"].norm(dim=-1))
        out["loo_sum_norm"].append(t["dz_out"].sum(0).norm(dim=-1))
        out["dai_fro"].append(t["kv_fro"])
        out["dai_action_norm"].append(v_norm * t["dots"].abs())
        out["dai_scaled_action_norm"].append(v_norm * s.abs())
        out["dai_action_out_norm"].append(t["wv"].norm(dim=-1) * s.abs())
        out["dai_spearman"].append(_spearman(v_norm * s, v_norm * p))
        out["dai_cos"].append(torch.nn.functional.cosine_similarity(t["relaxed"], t["z"], dim=-1))
        out["score"].append(_scores(t["dots"], scale, cap_c))
    arrays = {k: torch.stack(vs).to(torch.float32).cpu().numpy() for k, vs in out.items()}
    return TokenUpdates(query=query, keys=np.arange(query + 1), scale=scale,
                        gqa_group=loaded.arch.gqa_group, **arrays)


def _shared_key_terms(cap: QueryRowsCapture, layer: int, w_o: Tensor) -> dict[str, Tensor]:
    """The row-independent float64 terms of one layer, for keys 0..K−1.

    Returns:
        `w` [d, H, d_h] (W_O per head), `v_h` / `k_h` [H, T, d_h] (KV heads expanded),
        `wv` = W_O^h v_t [H, T, d], `v_norm` / `wv_norm` [H, T], `kv_fro` = ‖v_t‖‖k̃_t‖ [H_kv, T].
    """
    f64 = torch.float64
    k = cap.rot_k[layer].to(f64)                          # [K, H_kv, d_h]
    v = cap.v[layer].to(f64)
    H = cap.rot_q[layer].shape[1]
    d_h = k.shape[-1]
    G = H // k.shape[1]
    w = w_o.detach().to(k.device, f64).reshape(-1, H, d_h)  # [d, H, d_h]
    v_h = v.repeat_interleave(G, dim=1).transpose(0, 1)   # [H, T, d_h]
    k_h = k.repeat_interleave(G, dim=1).transpose(0, 1)
    wv = torch.einsum("dhe,hte->htd", w, v_h)
    return {"w": w, "v_h": v_h, "k_h": k_h, "wv": wv, "v_norm": v_h.norm(dim=-1),
            "wv_norm": wv.norm(dim=-1), "kv_fro": (v.norm(dim=-1) * k.norm(dim=-1)).T}


def _scores(dots: Tensor, scale: float, softcap: float | None) -> Tensor:
    """Pre-softmax scores s = q̃·k̃ · scale, soft-capped as c·tanh(s/c) where the model does
    (Gemma-2)."""
    s = dots * scale
    return s if softcap is None else softcap * torch.tanh(s / softcap)


def _row_quantities(cap: QueryRowsCapture, sh: dict[str, Tensor], layer: int, i: int,
                    scale: float, softcap: float | None = None) -> dict[str, Tensor]:
    """Every `TokenUpdates` quantity of row i at one layer (float64, keys 0..rows[i])."""
    f64 = torch.float64
    n = cap.rows[i] + 1
    p = cap.pattern[layer][:, i, :n].to(f64)              # [H, T]
    q = cap.rot_q[layer][i].to(f64)                       # [H, d_h]
    z = cap.z[layer][i].to(f64)
    v_h, k_h, wv = sh["v_h"][:, :n], sh["k_h"][:, :n], sh["wv"][:, :n]
    v_norm, wv_norm = sh["v_norm"][:, :n], sh["wv_norm"][:, :n]
    coef = p / (1.0 - p)
    dz = coef[..., None] * (v_h - z[:, None, :])          # p (v_t − z)/(1 − p)  [H, T, d_h]
    wz = torch.einsum("dhe,he->hd", sh["w"], z)           # W_O^h z  [H, d]
    dz_out = coef[..., None] * (wv - wz[:, None, :])      # W_O^h δz  [H, T, d]
    dots = torch.einsum("hte,he->ht", k_h, q)
    s = dots * scale                                      # linear (Dai's relaxed attention)
    relaxed = torch.einsum("ht,hte->he", s, v_h)
    return {
        "mass": p,
        "contrib_norm": p * wv_norm,
        "contrib_sum_norm": torch.einsum("ht,htd->td", p, wv).norm(dim=-1),
        "loo_norm": dz.norm(dim=-1),
        "loo_out_norm": dz_out.norm(dim=-1),
        "loo_sum_norm": dz_out.sum(0).norm(dim=-1),
        "dai_fro": sh["kv_fro"][:, :n],
        "dai_action_norm": v_norm * dots.abs(),
        "dai_scaled_action_norm": v_norm * s.abs(),
        "dai_action_out_norm": wv_norm * s.abs(),
        "dai_spearman": _spearman(v_norm * s, v_norm * p),
        "dai_cos": torch.nn.functional.cosine_similarity(relaxed, z, dim=-1),
        "score": _scores(dots, scale, softcap),
    }


"""The answer-loss landscape on a 2-D plane through the weights (docs/methods.md#landscape).

f(x, y) = mean answer NLL of the trace WITHOUT its trajectory (prompt + scaffold + answer) under the
weights θ + x·δ₁ + y·δ₂. Entry points:

* `plane_params(loaded)`: the perturbed tensors, every parameter except the token embedding and the
  unembedding (RaML's choice; both are the same tensor in a tied model), by canonical name
  `L{l}.{role}.{weight|bias}` / `final_norm.weight`.
* `random_directions(params, seed, style)`: two seeded Gaussian directions, normalised
  "raml" (tensor-wise: d ← d·‖θ_k‖/‖d‖, 1-D tensors kept) or "filter" (Li et al. 2018:
  each row of a matrix to its weight row's norm, 1-D tensors zeroed).
* `PlaneModel`: a functional Llama-style forward (RMSNorm, RoPE through the model's own rotary
  module, GQA, gated MLP) that runs G weight perturbations at once as stacked weight copies
  ([G, out, in] batched matmuls), so a 21×21 grid costs a few batched forwards instead of 441.
  `PlaneModel.nll(coords)` is the grid; `row_patches=` adds per-row rank-1 MLP patches (the
  implicit-update endpoint, `probes.measures.landscape.path`).

Positions: "kept" feeds the trajectory-free tokens with their original position ids (a gap where
the trajectory was: equal to masking the trajectory keys, the convention under which the Dherin
patches are exact); "shifted" renumbers them 0..n−1 (a truncated run, RaML's input and
`answer_scores(without_trajectory(tt))`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from hooks.model import LoadedModel
from hooks.weights import llama_layers
from probes.errors import ProbesError
from probes.measures.answers import without_trajectory
from probes.measures.landscape import POSITIONS as POSITIONS
from probes.measures.landscape import STYLES as STYLES
from probes.traces.tokenize import TokenizedTrace

ROLES = ("attn_norm", "q_proj", "k_proj", "v_proj", "o_proj", "mlp_norm", "gate_proj", "up_proj",
         "down_proj")

Params = dict[str, Tensor]
"""Canonical name → float32 tensor (CPU or the model's device)."""


class LandscapeError(ProbesError, ValueError):
    """Unsupported model, bad grid settings or a trace that cannot be scored."""


def _modules(loaded: LoadedModel) -> list[dict[str, torch.nn.Module]]:
    views = llama_layers(loaded, what="landscape", error=LandscapeError, require_rope=True)
    out = []
    for v in views:
        mods = {r: getattr(v, r) for r in ROLES}
        attn = v.module.self_attn
        for extra in ("q_norm", "k_norm"):
            if getattr(attn, extra, None) is not None:
                mods[extra] = getattr(attn, extra)
        out.append(mods)
    return out


def plane_params(loaded: LoadedModel) -> Params:
    """Every perturbed tensor (float32 copies), embeddings and unembedding excluded.

    Raises:
        LandscapeError: For a model without the Llama-style layout or with an MLP bias.
    """
    params: Params = {}
    for l, mods in enumerate(_modules(loaded)):
        for role, mod in mods.items():
            for kind in ("weight", "bias"):
                t = getattr(mod, kind, None)
                if t is not None:
                    params[f"L{l}.{role}.{kind}"] = t.detach().float().clone()
        for role in ("gate_proj", "up_proj", "down_proj"):
            if f"L{l}.{role}.bias" in params:
                raise LandscapeError("landscape supports bias-free MLP projections only.")
    params["final_norm.weight"] = loaded.hf_model.model.norm.weight.detach().float().clone()
    return params


def random_directions(params: Mapping[str, Tensor], seed: int, style: str = "raml"
                      ) -> tuple[Params, Params]:
    """Two seeded random directions over `params`, normalised as `style` says.

    Args:
        params: Output of `plane_params`.
        seed: Seed of a CPU `torch.Generator` (the same seed gives the same directions for the same
            parameter shapes, whatever the device).
        style: "raml" (each tensor rescaled to its parameter's Frobenius norm, 1-D included) or
            "filter" (each row of a ≥2-D tensor rescaled to that row's norm; 1-D tensors zero).

    Returns:
        `(δ₁, δ₂)`, dicts with the keys and shapes of `params`.

    Raises:
        LandscapeError: For an unknown style.
    """
    if style not in STYLES:
        raise LandscapeError(f"unknown direction style {style!r}; choose one of {STYLES}")
    gen = torch.Generator().manual_seed(int(seed))
    out: tuple[Params, Params] = ({}, {})
    for which in range(2):
        for name in sorted(params):
            p = params[name]
            d = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.device)
            if style == "raml":
                d = d * (p.norm() / d.norm().clamp_min(1e-30))
            elif p.dim() <= 1:
                d = torch.zeros_like(p)
            else:
                rows_p = p.reshape(p.shape[0], -1).norm(dim=1)
                rows_d = d.reshape(d.shape[0], -1).norm(dim=1).clamp_min(1e-30)
                d = d * (rows_p / rows_d).reshape(-1, *([1] * (p.dim() - 1)))
            out[which][name] = d
    return out


def inner(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    """⟨a, b⟩ summed over the tensors both hold (float64)."""
    return float(sum((a[k].double() * b[k].double()).sum() for k in a if k in b))


def grid_axis(n: int, span: float) -> np.ndarray:
    """`linspace(−span, span, n)` (n odd puts 0 on the grid; RaML uses n = 10, span = 1)."""
    if n < 2 or span <= 0:
        raise LandscapeError(f"grid needs at least 2 points and a positive range; got {n}, {span}")
    return np.linspace(-span, span, n)


@dataclass
class RowPatch:
    """Per-row rank-1 MLP patches of one layer, applied as ΔW·input = left (right·input).

    Attributes:
        rows: Rows of the evaluated sequence they apply to [R] (long).
        gate_left, up_left: [R, d_mlp]; right: [R, d] (acts on the MLP input u).
        down_left: [R, d]; down_right: [R, d_mlp] (acts on the MLP hidden φ).
        Any factor may carry a leading axis G (one patch per evaluated point).
    """

    rows: Tensor
    gate_left: Tensor
    up_left: Tensor
    right: Tensor
    down_left: Tensor
    down_right: Tensor


def _rms(x: Tensor, gamma: Tensor, eps: float) -> Tensor:
    """HF RMSNorm with a batched γ [G, d] (or [G, 1, 1, d] for q/k norms)."""
    return gamma * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _affine(stack_ks: tuple[Tensor, tuple[int, ...]], c: Tensor) -> Tensor:
    """A 1-D tensor at G points: θ + Σ_k c[:, k] δ_k → [G, dim]."""
    stack, ks = stack_ks
    out = stack[0].expand(c.shape[0], -1)
    for i, k in enumerate(ks):
        out = out + c[:, k, None] * stack[i + 1]
    return out


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class PlaneModel:
    """The trajectory-free answer NLL as a function of a batch of weight perturbations.

    Example:
        >>> pm = PlaneModel(loaded, tt, positions="kept")
        >>> d1, d2 = random_directions(pm.params, seed=0)
        >>> nll = pm.nll(np.array([[0.0, 0.0], [0.5, -0.5]]), d1, d2)      # [2]
        >>> grid = pm.grid(xs, ys, d1, d2)                                  # [len(ys), len(xs)]
    """

    def __init__(self, loaded: LoadedModel, tt: TokenizedTrace, *, positions: str = "kept",
                 params: Params | None = None) -> None:
        if positions not in POSITIONS:
            raise LandscapeError(f"unknown positions {positions!r}; choose one of {POSITIONS}")
        a, b = tt.spans["answer"]
        t0, t1 = tt.spans["trajectory"]
        if b - a < 1:
            raise LandscapeError(f"trace {tt.trace.id!r} has an empty answer span")
        self.mods = _modules(loaded)
        self.params = params if params is not None else plane_params(loaded)
        self.device = loaded.device
        hf = loaded.hf_model
        self.embed = hf.get_input_embeddings().weight.detach().float()
        self.unembed = hf.get_output_embeddings().weight.detach().float()
        head = hf.get_output_embeddings()
        self.unembed_bias = None if getattr(head, "bias", None) is None else head.bias.detach().float()
        self.rotary = hf.model.rotary_emb
        self.eps = [float(getattr(m["attn_norm"], "variance_epsilon",
                                  getattr(m["attn_norm"], "eps", 1e-6))) for m in self.mods]
        cfg = hf.config
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads)
        attn = hf.model.layers[0].self_attn
        self.scaling = float(getattr(attn, "scaling", 0.0) or self.head_dim ** -0.5)
        norm = hf.model.norm
        self.final_eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
        wo = without_trajectory(tt)
        n_t = t1 - t0
        end = b - n_t - 1                                           # last row needed: predicts b−1
        self.ids = torch.as_tensor(wo.ids[:end], dtype=torch.long, device=self.device)
        pos = np.arange(end)
        if positions == "kept":
            pos = np.where(pos >= t0, pos + n_t, pos)
        self.position_ids = torch.as_tensor(pos, dtype=torch.long, device=self.device)
        self.pred_rows = torch.arange(a - n_t - 1, end, device=self.device)
        self.targets = torch.as_tensor(wo.ids[a - n_t:b - n_t], dtype=torch.long, device=self.device)
        self.traj_start = t0
        self.n_traj = n_t

    def _plane(self, d1: Mapping[str, Tensor] | None, d2: Mapping[str, Tensor] | None
               ) -> dict[str, tuple[Tensor, tuple[int, ...]]]:
        """Per tensor: [θ; δ_k for the directions that hold it] stacked on a new first axis, and k."""
        out = {}
        for name, p in self.params.items():
            ks = tuple(k for k, d in enumerate((d1, d2)) if d is not None and name in d)
            mats = [p] + [(d1, d2)[k][name].float() for k in ks]
            out[name] = (torch.stack(mats).to(self.device), ks)
        return out

    @torch.no_grad()
    def forward_nll(self, coords: Float[np.ndarray, "g 2"], d1: Mapping[str, Tensor] | None = None,
                    d2: Mapping[str, Tensor] | None = None,
                    row_patches: Sequence[RowPatch] | None = None,
                    plane: dict[str, tuple[Tensor, tuple[int, ...]]] | None = None,
                    ) -> Float[Tensor, " g"]:
        """Mean answer NLL at each of G points θ + x δ₁ + y δ₂ in ONE batched forward.

        Every weight is affine in (x, y), so a linear layer is one GEMM of the shared activations
        [G·n, in] against [W; δ₁W; δ₂W] followed by `o₀ + x o₁ + y o₂` (exact, no per-point weight
        copies); norms and biases are formed per point. `row_patches` add per-row rank-1 MLP patches
        (`probes.measures.landscape.path.endpoint_row_patches`) at every point.
        """
        plane = plane if plane is not None else self._plane(d1, d2)
        c = torch.as_tensor(np.asarray(coords, dtype=np.float64).reshape(-1, 2),
                            dtype=torch.float32, device=self.device)
        g, n = c.shape[0], self.ids.shape[0]
        x = self.embed[self.ids].expand(g, n, -1)
        cos, sin = self.rotary(x[:1], self.position_ids[None])
        cos, sin = cos[:, None].float(), sin[:, None].float()      # [1, 1, n, d_h]
        causal = torch.full((n, n), float("-inf"), device=self.device).triu(1)
        for l in range(len(self.mods)):
            pt = row_patches[l] if row_patches is not None else None
            x = self._layer(x, c, plane, f"L{l}.", self.eps[l], cos, sin, causal, pt)
        gamma = _affine(plane["final_norm.weight"], c)
        h = _rms(x[:, self.pred_rows], gamma[:, None, :], self.final_eps)
        logits = h @ self.unembed.T
        if self.unembed_bias is not None:
            logits = logits + self.unembed_bias
        logp = torch.log_softmax(logits.float(), -1)
        return -logp.gather(-1, self.targets[None, :, None].expand(g, -1, 1))[..., 0].mean(-1)

    def _layer(self, x: Tensor, c: Tensor, plane: Mapping[str, tuple[Tensor, tuple[int, ...]]],
               pre: str, eps: float, cos: Tensor, sin: Tensor, causal: Tensor,
               pt: RowPatch | None) -> Tensor:
        """One decoder layer at G points (`plane` from `_plane`, names prefixed `pre`)."""
        g, n = x.shape[:2]
        H, K, dh = self.n_heads, self.n_kv, self.head_dim

        def lin(h: Tensor, role: str) -> Tensor:
            stack, ks = plane[f"{pre}{role}.weight"]
            o = (h @ stack.flatten(0, 1).T).unflatten(-1, (stack.shape[0], stack.shape[1]))
            out = o[..., 0, :]
            for i, k in enumerate(ks):
                out = out + c[:, k, None, None] * o[..., i + 1, :]
            bias = plane.get(f"{pre}{role}.bias")
            return out if bias is None else out + _affine(bias, c)[:, None, :]

        def vec(role: str) -> Tensor:
            return _affine(plane[f"{pre}{role}.weight"], c)

        h = _rms(x, vec("attn_norm")[:, None, :], eps)
        q = lin(h, "q_proj").reshape(g, n, H, dh).transpose(1, 2)
        k = lin(h, "k_proj").reshape(g, n, K, dh).transpose(1, 2)
        v = lin(h, "v_proj").reshape(g, n, K, dh).transpose(1, 2)
        if f"{pre}q_norm.weight" in plane:
            q = _rms(q, vec("q_norm")[:, None, None, :], eps)
            k = _rms(k, vec("k_norm")[:, None, None, :], eps)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k = k.repeat_interleave(H // K, dim=1)
        v = v.repeat_interleave(H // K, dim=1)
        scores = q @ k.transpose(-1, -2) * self.scaling + causal
        z = (scores.softmax(-1) @ v).transpose(1, 2).reshape(g, n, H * dh)
        x = x + lin(z, "o_proj")
        u = _rms(x, vec("mlp_norm")[:, None, :], eps)
        gate, up = lin(u, "gate_proj"), lin(u, "up_proj")
        if pt is not None:
            s = (u[:, pt.rows] * pt.right).sum(-1, keepdim=True)
            gate = gate.index_add(1, pt.rows, pt.gate_left * s)
            up = up.index_add(1, pt.rows, pt.up_left * s)
        phi = torch.nn.functional.silu(gate) * up
        y = lin(phi, "down_proj")
        if pt is not None:
            s = (phi[:, pt.rows] * pt.down_right).sum(-1, keepdim=True)
            y = y.index_add(1, pt.rows, pt.down_left * s)
        return x + y

    def nll(self, coords: Float[np.ndarray, "g 2"], d1: Mapping[str, Tensor] | None,
            d2: Mapping[str, Tensor] | None, *, batch: int = 128) -> np.ndarray:
        """The answer NLL at each point (x, y) of `coords` [G, 2], `batch` points per forward."""
        coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
        plane = self._plane(d1, d2)
        out = [self.forward_nll(coords[i:i + batch], plane=plane).double().cpu().numpy()
               for i in range(0, len(coords), batch)]
        return np.concatenate(out) if out else np.zeros(0)

    def grid(self, xs: np.ndarray, ys: np.ndarray, d1: Mapping[str, Tensor] | None,
             d2: Mapping[str, Tensor] | None, *, batch: int = 128) -> np.ndarray:
        """The NLL on the grid `xs × ys` as [len(ys), len(xs)] (row = y, column = x)."""
        gx, gy = np.meshgrid(np.asarray(xs, float), np.asarray(ys, float))
        pts = np.stack([gx.ravel(), gy.ravel()], -1)
        return self.nll(pts, d1, d2, batch=batch).reshape(len(ys), len(xs))

    @torch.no_grad()
    def check_origin(self, loaded: LoadedModel, tol: float = 1e-3) -> float:
        """Compare the origin with the model's own forward on the same tokens and position ids.

        A guard against an architecture detail this functional forward does not reproduce (it
        implements the Llama / Qwen2 / Qwen3 decoder); returns |difference| in nats.

        Raises:
            LandscapeError: When they differ by more than `tol`.
        """
        logits = loaded.bridge(self.ids[None], return_type="logits",
                               position_ids=self.position_ids[None])[0, self.pred_rows].float()
        ref = float(-torch.log_softmax(logits, -1).gather(-1, self.targets[:, None]).mean())
        diff = abs(float(self.nll(np.zeros((1, 2)), None, None)[0]) - ref)
        if not diff <= tol:
            raise LandscapeError(
                f"landscape's batched forward differs from {loaded.spec!r}'s own forward by "
                f"{diff:.2e} nats at the origin; this architecture has a detail it does not "
                f"implement (supported: Llama, Qwen2, Qwen3 decoders)")
        return diff

    def remap_rows(self, rows: Sequence[int]) -> Int[Tensor, " r"]:
        """Rows of the full trace (all after the trajectory) → rows of this trajectory-free input."""
        r = torch.as_tensor([int(i) - self.n_traj for i in rows], dtype=torch.long, device=self.device)
        if len(r) and (int(r[0]) < self.traj_start):
            raise LandscapeError("row patches apply only to rows after the trajectory")
        return r

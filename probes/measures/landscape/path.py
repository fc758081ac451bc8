"""The exact implicit-update path through the weights and its projection onto a plane
(docs/methods.md#landscape).

For every row r after the trajectory (scaffold + answer rows, the rows V5b patches), every layer and
every prefix t = −1..T−1 (index t+1; index 0 = no trajectory), the trajectory's effect on the MLP is
the Dherin patch (M5, base u' = u^{(−1)}, frozen upstream, from ONE clean capture):

    ΔW_gate = W_gate (u^{(t)} − u') u'ᵀ/‖u'‖²,   ΔW_up likewise,
    ΔW_down = (m^{(t)} − m') φ^{(t)ᵀ}/‖φ^{(t)}‖²,  φ^{(t)} = SiLU(W_gate u^{(t)}) ⊙ W_up u^{(t)}

so at t = T−1 (every row, every layer) the trajectory-free forward reproduces the full-context
logits (V5b). The patch depends on the row (Dherin's update is query-dependent), so the path lives
in the space of per-row weight copies; a plane of SHARED weights (δ₁, δ₂) sees its orthogonal
projection onto the shared subspace, the row mean ΔW̄_t = (1/R) Σ_r ΔW_{r,t}. Everything below
works on the rank-1 factors (⟨a bᵀ, D⟩ = aᵀ D b, ⟨a bᵀ, c dᵀ⟩ = (a·c)(b·d)); no d_mlp × d matrix is
built per token. `materialised_path` builds them, for the tests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float64
from torch import Tensor

from hooks.model import LoadedModel
from probes.measures.landscape.plane import LandscapeError, PlaneModel, RowPatch, inner
from probes.measures.updates.mlp import F64, capture_rows, check_positions, layer_weights, restricted_inputs
from probes.traces.tokenize import TokenizedTrace

FAMILIES = ("gate_proj", "up_proj", "down_proj")


@dataclass
class LayerPath:
    """Rank-1 factors of one layer's path, per row r and prefix index t (float64).

    Attributes:
        du: u^{(t)} − u' [R, T+1, d] (the gate/up left factor is W du).
        right: u'/‖u'‖² [R, d] (gate/up right factor, the same for every t).
        dm: m^{(t)} − m' [R, T+1, d] (down left factor).
        phihat: φ^{(t)}/‖φ^{(t)}‖² [R, T+1, d_mlp] (down right factor).
        w_gate, w_up: The layer's weights [d_mlp, d].
    """

    du: Float64[Tensor, "r t1 d"]
    right: Float64[Tensor, "r d"]
    dm: Float64[Tensor, "r t1 d"]
    phihat: Float64[Tensor, "r t1 m"]
    w_gate: Float64[Tensor, "m d"]
    w_up: Float64[Tensor, "m d"]

    def left(self, family: str) -> Tensor:
        """The left factors [R, T+1, d_mlp] of gate / up (built on demand; tests, endpoint)."""
        w = self.w_gate if family == "gate_proj" else self.w_up
        return self.du @ w.T


@dataclass
class ImplicitPath:
    """The implicit-update path of one trace.

    Attributes:
        rows: Rows of the full trace that carry patches (trajectory end .. last answer-predicting).
        trajectory: (start, end) of the trajectory span.
        layers: One `LayerPath` per layer.
    """

    rows: list[int]
    trajectory: tuple[int, int]
    layers: list[LayerPath]

    @property
    def n_points(self) -> int:
        """T + 1 (index 0 = no trajectory)."""
        return int(self.layers[0].du.shape[1])


def implicit_path(loaded: LoadedModel, tt: TokenizedTrace) -> ImplicitPath:
    """Capture once and build the per-row, per-layer path factors.

    Raises:
        LandscapeError: For an empty trajectory or answer; MlpUpdateError for an unsupported model.
    """
    t0, t1 = tt.spans["trajectory"]
    a, b = tt.spans["answer"]
    if t1 <= t0 or b <= a:
        raise LandscapeError(f"trace {tt.trace.id!r} needs a non-empty trajectory and answer")
    rows = list(range(t1, b - 1))
    ids, rows, traj = check_positions(loaded, torch.as_tensor(tt.ids), rows, range(t0, t1))
    weights = layer_weights(loaded)
    cap = capture_rows(loaded, ids, rows)
    layers = []
    for l, w in enumerate(weights):
        m, u = restricted_inputs(cap, w, l, traj)                     # [R, T+1, d]
        phi = torch.nn.functional.silu(u @ w.w_gate.T) * (u @ w.w_up.T)
        base = u[:, 0]
        layers.append(LayerPath(
            du=u - base[:, None], right=base / base.pow(2).sum(-1, keepdim=True),
            dm=m - m[:, :1], phihat=phi / phi.pow(2).sum(-1, keepdim=True).clamp_min(1e-300),
            w_gate=w.w_gate, w_up=w.w_up))
    return ImplicitPath(rows=rows, trajectory=(t0, t1), layers=layers)


def endpoint_row_patches(path: ImplicitPath, rows: Tensor, index: int | Sequence[int] = -1,
                         dtype: torch.dtype = torch.float32) -> list[RowPatch]:
    """The per-row patches at path index `index` (default the end, t = T) for `PlaneModel`.

    Args:
        path: The path.
        rows: The same rows in the evaluated (trajectory-free) sequence (`PlaneModel.remap_rows`).
        index: Path index (0 = no trajectory, −1 = full trajectory), or a sequence of G indices:
            the factors then get a leading axis G, one path point per evaluated grid point.
        dtype: Dtype of the patch factors.
    """
    idx = index if isinstance(index, int) else torch.as_tensor(list(index), dtype=torch.long)
    out = []
    for lp in path.layers:
        def pick(t: Tensor) -> Tensor:
            return (t[:, idx] if isinstance(idx, int) else t[:, idx].transpose(0, 1)).to(dtype)

        out.append(RowPatch(
            rows=rows, gate_left=pick(lp.left("gate_proj")), up_left=pick(lp.left("up_proj")),
            right=lp.right.to(dtype), down_left=pick(lp.dm), down_right=pick(lp.phihat)))
    return out


def path_nll(pm: PlaneModel, path: ImplicitPath, *, batch: int = 64) -> Float64[np.ndarray, " t1"]:
    """Answer NLL of the trajectory-free input at every point of the per-row path (exact patches
    of prefix t at every row and layer, base weights), `batch` path points per forward.

    Index 0 is the origin; index T equals the full-context NLL ("kept" positions, V5b).
    """
    rows = pm.remap_rows(path.rows)
    out = []
    for start in range(0, path.n_points, batch):
        idx = list(range(start, min(start + batch, path.n_points)))
        patches = endpoint_row_patches(path, rows, idx)
        out.append(pm.forward_nll(np.zeros((len(idx), 2)), row_patches=patches).double().numpy())
    return np.concatenate(out)


def _key(l: int, family: str) -> str:
    return f"L{l}.{family}.weight"


def project(path: ImplicitPath, direction: Mapping[str, Tensor]) -> Float64[np.ndarray, " t1"]:
    """⟨ΔW̄_t, δ⟩ for every path index t, by rank-1 algebra (tensors δ lacks count as zero)."""
    total = torch.zeros(path.n_points, dtype=F64)
    for l, lp in enumerate(path.layers):
        R = lp.du.shape[0]
        for family, w in (("gate_proj", lp.w_gate), ("up_proj", lp.w_up)):
            d = direction.get(_key(l, family))
            if d is not None:
                wtdb = (lp.right @ d.to(F64).cpu().T) @ w                # [R, d]: Wᵀ D b_r
                total += torch.einsum("rti,ri->t", lp.du, wtdb) / R
        d = direction.get(_key(l, "down_proj"))
        if d is not None:
            total += torch.einsum("rti,rti->t", lp.dm, lp.phihat @ d.to(F64).cpu().T) / R
    return total.numpy()


def path_gram(path: ImplicitPath) -> tuple[Float64[np.ndarray, "t1 t1"], Float64[np.ndarray, " t1"]]:
    """Gram matrix K[t, t'] = ⟨ΔW̄_t, ΔW̄_t'⟩ of the shared path, and the per-row sums
    Σ_r ‖ΔW_{r,t}‖² of the row-copy path (for the shared fraction), by rank-1 algebra."""
    n = path.n_points
    K = torch.zeros(n, n, dtype=F64)
    per_row = torch.zeros(n, dtype=F64)
    for lp in path.layers:
        R = lp.du.shape[0]
        bb = lp.right @ lp.right.T                                       # [R, R]
        for w in (lp.w_gate, lp.w_up):
            y = lp.du @ (w.T @ w)                                        # [R, T+1, d]
            for r in range(R):
                block = y[r] @ lp.du.transpose(1, 2)                     # [R_s, T+1, T+1]
                K += torch.einsum("s,stu->tu", bb[r], block) / R**2
                per_row += block[r].diagonal() * bb[r, r]
        for r in range(R):
            dd = lp.dm[r] @ lp.dm.transpose(1, 2)                        # [R_s, T+1, T+1]
            pp = lp.phihat[r] @ lp.phihat.transpose(1, 2)
            K += (dd * pp).sum(0) / R**2
            per_row += (dd[r] * pp[r]).diagonal()
    return K.numpy(), per_row.numpy()


@dataclass
class PathPlane:
    """The plane through the base weights that best contains the shared path (uncentred PCA).

    Attributes:
        directions: (P₁, P₂) unit-norm directions (only MLP tensors are non-zero).
        coords: Path coordinates on (P₁, P₂) [T+1, 2] (exact: ⟨ΔW̄_t, P_k⟩).
        captured: (λ₁ + λ₂)/Σλ: fraction of Σ_t ‖ΔW̄_t‖² the plane holds.
        eigenvalues: All eigenvalues of K, descending.
        shared_fraction: Σ_t R‖ΔW̄_t‖² / Σ_t Σ_r ‖ΔW_{r,t}‖²: how much of the per-row path lies in
            the shared-weight subspace at all.
    """

    directions: tuple[dict[str, Tensor], dict[str, Tensor]]
    coords: Float64[np.ndarray, "t1 2"]
    captured: float
    eigenvalues: Float64[np.ndarray, " t1"]
    shared_fraction: float


def path_plane(path: ImplicitPath, dtype: torch.dtype = torch.float32) -> PathPlane:
    """Top-2 principal directions of {ΔW̄_t} from the Gram of rank-1 terms (Li et al.'s PCA plane,
    uncentred so the plane passes through the base weights = the grid's origin).

    Raises:
        LandscapeError: When the path has fewer than two independent directions (e.g. T = 1).
    """
    K, per_row = path_gram(path)
    lam, vec = np.linalg.eigh(K)
    lam, vec = lam[::-1], vec[:, ::-1]
    total = float(np.trace(K))
    if total <= 0 or lam[1] <= 1e-12 * lam[0]:
        raise LandscapeError("the implicit-update path spans fewer than two directions; "
                             "no path plane (a longer trajectory is needed)")
    R = len(path.rows)
    dirs: tuple[dict[str, Tensor], dict[str, Tensor]] = ({}, {})
    coords = np.zeros((path.n_points, 2))
    for k in range(2):
        c = torch.as_tensor(vec[:, k].copy(), dtype=F64) / np.sqrt(lam[k])
        coords[:, k] = vec[:, k] * np.sqrt(lam[k])
        for l, lp in enumerate(path.layers):
            left_u = torch.einsum("t,rti->ri", c, lp.du)                 # Σ_t c_t du_{r,t}
            m_gu = left_u.T @ lp.right / R                               # [d, d]
            dirs[k][_key(l, "gate_proj")] = (lp.w_gate @ m_gu).to(dtype)
            dirs[k][_key(l, "up_proj")] = (lp.w_up @ m_gu).to(dtype)
            dirs[k][_key(l, "down_proj")] = (torch.einsum("t,rti,rtj->ij", c, lp.dm, lp.phihat)
                                              / R).to(dtype)
    return PathPlane(directions=dirs, coords=coords, captured=float((lam[0] + lam[1]) / total),
                     eigenvalues=lam.copy(), shared_fraction=float(R * total / per_row.sum()))


def plane_coords(path: ImplicitPath, d1: Mapping[str, Tensor], d2: Mapping[str, Tensor],
                 gram: np.ndarray | None = None, *, plane_gram: np.ndarray | None = None,
                 ) -> tuple[Float64[np.ndarray, "t1 2"], float]:
    """Orthogonal projection of the shared path onto span(δ₁, δ₂) and the captured fraction.

    With G = [[⟨δ₁,δ₁⟩, ⟨δ₁,δ₂⟩], [⟨δ₂,δ₁⟩, ⟨δ₂,δ₂⟩]] and c_t = (⟨ΔW̄_t, δ₁⟩, ⟨ΔW̄_t, δ₂⟩):
    (α_t, β_t) = G⁻¹ c_t (= ⟨ΔW̄_t, δ_k⟩/‖δ_k‖² when δ₁ ⊥ δ₂) and the captured fraction is
    Σ_t c_tᵀ G⁻¹ c_t / Σ_t ‖ΔW̄_t‖².

    Args:
        path: The path.
        d1, d2: The plane's directions (all tensors count in G).
        gram: K from `path_gram` (computed when None).
        plane_gram: G (computed when None; a run reuses one for every trace).
    """
    g = plane_gram if plane_gram is not None else np.array(
        [[inner(d1, d1), inner(d1, d2)], [inner(d2, d1), inner(d2, d2)]])
    c = np.stack([project(path, d1), project(path, d2)], -1)           # [T+1, 2]
    coef = np.linalg.solve(g, c.T).T
    K = path_gram(path)[0] if gram is None else gram
    total = float(np.trace(K))
    captured = float((c * coef).sum() / total) if total > 0 else float("nan")
    return coef, captured


def materialised_path(path: ImplicitPath) -> list[dict[str, Tensor]]:
    """The dense ΔW̄_t per path index (reference for the tests; small models only)."""
    out = []
    for t in range(path.n_points):
        mats = {}
        for l, lp in enumerate(path.layers):
            R = lp.du.shape[0]
            for family in ("gate_proj", "up_proj"):
                mats[_key(l, family)] = sum(torch.outer(lp.left(family)[r, t], lp.right[r])
                                            for r in range(R)) / R
            mats[_key(l, "down_proj")] = sum(torch.outer(lp.dm[r, t], lp.phihat[r, t])
                                             for r in range(R)) / R
        out.append(mats)
    return out


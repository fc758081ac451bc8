"""The jaxtyping shape annotations of `hooks` and `probes.measures` are checked at run time.

pyproject's pytest `addopts` pass `--jaxtyping-packages=probes.measures,hooks,beartype.beartype`:
jaxtyping's import hook decorates every function and dataclass of those packages with
`@jaxtyped(typechecker=beartype)`, so a call with an array of the wrong shape or dtype raises
`jaxtyping.TypeCheckError` before the body runs. These tests fail if that option is dropped.
Both kinds of module are covered: `hooks.reduce` (plain annotations) and `probes.measures.updates.mlp`
(`from __future__ import annotations`: string annotations, resolved by jaxtyping at decoration).
"""

import pytest
import torch
from jaxtyping import TypeCheckError

from hooks.reduce import delta_rows
from probes.measures.updates.mlp import LayerWeights, restricted_prefix, rms_norm


def test_delta_rows_checks_shapes_and_dtype():
    pre, post = torch.zeros(3, 4), torch.ones(3, 4)
    assert torch.equal(delta_rows(pre, post), torch.ones(3, 4))   # the right shapes pass
    # [1, 4] would broadcast silently against [3, 4]: the "n_sel d_model" annotation refuses it
    with pytest.raises(TypeCheckError, match="post"):
        delta_rows(pre, torch.ones(1, 4))
    with pytest.raises(TypeCheckError):
        delta_rows(pre, torch.ones(3, 5))                         # d_model differs
    with pytest.raises(TypeCheckError):
        delta_rows(pre, torch.ones(3, 4, dtype=torch.long))       # Float, not Int
    with pytest.raises(TypeCheckError):
        delta_rows(pre, torch.ones(4))                            # rank


def test_rms_norm_checks_the_shared_axis():
    m, gamma = torch.randn(2, 5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
    assert rms_norm(m, gamma, 1e-6).shape == (2, 5)
    with pytest.raises(TypeCheckError, match="gamma"):
        rms_norm(m, torch.ones(4, dtype=torch.float64), 1e-6)    # d differs
    with pytest.raises(TypeCheckError):
        rms_norm(m, torch.ones(1, dtype=torch.float64), 1e-6)    # [1] broadcasts silently


def test_restricted_prefix_checks_symbolic_width():
    """`w_o` is "d h*d_h": its width must be heads × head width of `p` and `v_h`."""
    H, R, K, d_h, d, T = 2, 3, 6, 4, 5, 2
    p = torch.softmax(torch.randn(H, R, K, dtype=torch.float64), dim=-1)
    v_h = torch.randn(H, K, d_h, dtype=torch.float64)
    traj = torch.tensor([1, 3])
    x = torch.randn(R, d, dtype=torch.float64)
    gamma = torch.ones(d, dtype=torch.float64)
    m, u = restricted_prefix(p, v_h, traj, x, torch.randn(d, H * d_h, dtype=torch.float64), None,
                             gamma, 1e-6)
    assert m.shape == u.shape == (R, T + 1, d)
    with pytest.raises(TypeCheckError, match="w_o"):
        restricted_prefix(p, v_h, traj, x, torch.randn(d, H * d_h + 1, dtype=torch.float64), None,
                          gamma, 1e-6)
    with pytest.raises(TypeCheckError, match="trajectory"):
        restricted_prefix(p, v_h, traj.double(), x, torch.randn(d, H * d_h, dtype=torch.float64),
                          None, gamma, 1e-6)


def test_dataclass_fields_are_checked():
    """`LayerWeights` (float64 weights of one layer): d must agree across its fields."""
    d, d_mlp, f64 = 4, 6, torch.float64
    w = LayerWeights(w_o=torch.zeros(d, 8, dtype=f64), b_o=None, gamma=torch.ones(d, dtype=f64),
                     eps=1e-6, w_gate=torch.zeros(d_mlp, d, dtype=f64),
                     w_up=torch.zeros(d_mlp, d, dtype=f64), w_down=torch.zeros(d, d_mlp, dtype=f64))
    assert w.gram("gate").shape == (d, d)
    with pytest.raises(TypeCheckError):
        LayerWeights(w_o=torch.zeros(d, 8, dtype=f64), b_o=None, gamma=torch.ones(d, dtype=f64),
                     eps=1e-6, w_gate=torch.zeros(d_mlp, d + 1, dtype=f64), w_up=None, w_down=None)
    with pytest.raises(TypeCheckError):                              # float32, not float64
        LayerWeights(w_o=torch.zeros(d, 8), b_o=None, gamma=torch.ones(d), eps=1e-6,
                     w_gate=None, w_up=None, w_down=None)

"""Measurements: one module per quantity family, each a function of (model, tokenized trace) that
returns typed results; no files, no printing. Method notes: docs/methods.md.

- `answers`: answer NLL and greedy accuracy with and without the trajectory.
- `lhat` (with `lhat_layout`, `lhat_reference`, `lhat_per_token`): L̂, the answer NLL after every
  trajectory prefix (M8), exact and fast.
- `attention`: per-token attention updates at the answer query (M1–M4).
- `mlp`: the Dherin rank-1 MLP update of each token (M5).
- `alignment`: gradient alignment of each token's step (M6) and attribution of its removal (M7).
- `shared_pass`: the one pass that produces every stored `upd_*` array; `families`: what differs
  per model family for M1–M7; `sdpa_pass`, `attention_rows`: the linear-memory pass and M1–M4 at
  many rows.
- `pseudo_gradient`, `thought_patch`, `fitting`: the fitted linear maps (M12).
- `activations`: cached activations of one trace, chunked through the KV cache; `batching`:
  several short traces per forward, committed together.
- `landscape`, `landscape_path`: the answer loss on weight planes and the exact implicit-update path.
"""

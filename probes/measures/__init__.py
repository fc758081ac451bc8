"""Measurements: (model, tokenized trace) -> typed results; no files, no printing. Grouped by
family (method notes: docs/methods.md); each family package itself holds only the light constants
its flags show (choices, defaults), so the command line reads them without loading torch.

- `answers`: answer NLL and greedy accuracy with and without the trajectory.
- `lhat/`: L̂, the answer NLL after every trajectory prefix (M8): `fast` (one chunked prefill and
  packed suffixes), `reference` (RaML's per-prefix re-run), `layout`, `per_token`.
- `updates/`: per-token implicit updates at the answer query: M1–M4 (`attention`,
  `attention_rows`, `captures`), M5 (`mlp`, `mlp_patch`), M6/M7 (`alignment`), the one pass that
  stores them all (`shared_pass`), the linear-memory pass (`sdpa_pass`), what differs per model
  family (`families`, derived from `hooks.families`).
- `fits/`: the fitted linear maps (M12): `pseudo_gradient`, `thought_patch`, `fitting`.
- `landscape/`: the answer loss on weight planes (`plane`) and the exact implicit-update path
  (`path`).
- `anchors/`: sentence anchors: receiver heads and suppression (`receivers`), resampling
  importance (`resampling`).
- `effects/`: causal edits of single tokens' updates (V7, `edits`) and behaviour directions
  (`directions`).
- `capture/`: cached activations of one trace, chunked through the KV cache (`activations`), and
  several short traces per forward (`batching`).
"""

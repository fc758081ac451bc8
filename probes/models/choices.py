"""The choices of the model flags, in a light module (the command line reads them without
loading torch): `--control`, `--device-map` and `generate --backend`."""

CONTROLS: tuple[str, ...] = ("none", "random-init")
"""`--control`: the trained weights, or a seeded random initialisation of the same architecture."""

DEVICE_MAPS: tuple[str, ...] = ("auto", "balanced", "balanced_low_0", "sequential")
"""`--device-map` values (accelerate's placement strategies)."""

GENERATION_BACKENDS: tuple[str, ...] = ("hf", "vllm")
"""Generation backends: Hugging Face `generate` (default) and vLLM (an optional extra, GPU)."""

"""The choices of the model flags, in a light module (the command line reads them without
loading torch): `--model-dtype`, `--control`, `--device-map` and `generate --backend`."""

DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
"""`--model-dtype`: the names of `hooks.model.DTYPES` (hooks imports nothing of probes and loads
torch on import, so the names are written here too; a test keeps the two equal)."""

CONTROLS: tuple[str, ...] = ("none", "random-init")
"""`--control`: the trained weights, or a seeded random initialisation of the same architecture."""

DEVICE_MAPS: tuple[str, ...] = ("auto", "balanced", "balanced_low_0", "sequential")
"""`--device-map` values (accelerate's placement strategies)."""

GENERATION_BACKENDS: tuple[str, ...] = ("hf", "vllm")
"""Generation backends: Hugging Face `generate` (default) and vLLM (an optional extra, GPU)."""

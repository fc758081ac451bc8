"""Names of the parameter dtypes a model can be loaded in (light: the command line reads them
without loading torch; `hooks.model.DTYPES` maps them to torch dtypes)."""

DTYPE_NAMES: tuple[str, ...] = ("float32", "float16", "bfloat16")
"""Accepted dtype names, in the order the command line lists them."""

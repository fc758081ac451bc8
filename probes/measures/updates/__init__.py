"""M1–M7: per-token implicit updates (attention dual form, rank-1 MLP steps, alignment)."""

"""Sampling traces from a model (transformers or vLLM) into a resumable JSONL, and grading."""

"""Names of the per-token L̂ metrics, in a light module (the command line offers them as choices
without importing the statistics; `analyses.lhat_effects` computes them)."""

METRICS = ("delta", "abs_delta", "rho", "lam", "abs_lam")
"""Metric names: signed change Δ, |Δ|, RaML's relative change ρ, log-ratio λ, |λ|."""

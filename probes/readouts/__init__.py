"""Cache → numbers, without a model: the typed loader, comparisons, efficiency, model comparison,
inspection and the report."""

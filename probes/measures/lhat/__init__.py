"""L̂ (M8): the answer loss after every trajectory prefix, fast and reference."""

"""The demo: every analysis on the built-in tiny-reasoner, with its summary lines."""

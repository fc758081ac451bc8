"""The root of every error the hook library raises (`HooksError`); the CLI prints each as one line."""


class HooksError(Exception):
    """Base class of every error raised by `hooks`: an unknown site, an unsupported model, bad
    arguments to a capture or edit."""


class UnsupportedModelError(HooksError, ValueError):
    """The model lacks the modules a weight view or measurement needs (see `hooks.weights`)."""

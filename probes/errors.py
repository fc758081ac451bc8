"""One exception family for user-facing errors of the toolkit.

The CLI turns any user error into one line on stderr and exit code 2; anything else is a bug and
keeps its traceback. Messages name the bad input, the valid values and the fix. The library
packages keep their own roots (`hooks.errors.HooksError`, `cache.errors.CacheError`) so that they
need nothing of `probes`; `probes.run.user_errors()` lists all three for the CLI's edge.
"""


class ProbesError(Exception):
    """A user error: bad input, unknown model, malformed file. Message says how to fix it."""


class ModelNotFoundError(ProbesError, LookupError):
    """A model spec that is neither built in, a local folder, nor in the local HF cache."""


class TraceFormatError(ProbesError, ValueError):
    """A JSONL line that cannot be read as a trace."""


class LexiconError(ProbesError, ValueError):
    """A lexicon file that is missing or malformed."""


"""The loss landscape on a random plane and the implicit-update path across it."""


from __future__ import annotations

STYLES = ("raml", "filter")
"""Direction normalisations: RaML's tensor-wise one, Li et al.'s filter-wise one."""


POSITIONS = ("kept", "shifted")
"""Position ids of the trajectory-free input (see the module docstring)."""

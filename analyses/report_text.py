"""`plain_text`: LaTeX in traces and answers as readable plain text for the report (no backslash
noise): `\\frac{a}{b}` -> `(a)/(b)`, `\\boxed{x}` -> `[x]`, `$...$` / `\\(...\\)` / `\\[...\\]`
delimiters dropped, common symbols (`\\times`, `\\cdot`, `\\le`, `\\sqrt`, Greek letters) as
Unicode, other commands (`\\text{..}`, `\\mathrm{..}`, `\\left`, ...) unwrapped or dropped.
"""

from __future__ import annotations

import re

_SYMBOLS = {
    "times": "×", "cdot": "·", "div": "÷", "pm": "±", "mp": "∓", "le": "≤", "leq": "≤", "ge": "≥",
    "geq": "≥", "ne": "≠", "neq": "≠", "approx": "≈", "equiv": "≡", "infty": "∞", "to": "→",
    "rightarrow": "→", "Rightarrow": "⇒", "leftarrow": "←", "implies": "⇒", "in": "∈",
    "sum": "Σ", "prod": "Π", "int": "∫", "partial": "∂", "nabla": "∇", "circ": "°", "degree": "°",
    "alpha": "α", "beta": "β", "gamma": "γ", "delta": "δ", "Delta": "Δ", "epsilon": "ε",
    "theta": "θ", "lambda": "λ", "mu": "μ", "pi": "π", "rho": "ρ", "sigma": "σ", "Sigma": "Σ",
    "tau": "τ", "phi": "φ", "omega": "ω", "Omega": "Ω", "ldots": "…", "cdots": "⋯", "dots": "…",
    "quad": " ", "qquad": "  ", ",": " ", ";": " ", "!": "", " ": " ", "%": "%", "$": "$",
    "{": "{", "}": "}", "_": "_", "&": "&", "#": "#",
}
_UNWRAP = ("text", "textbf", "textit", "mathrm", "mathbf", "mathit", "operatorname", "mbox",
           "displaystyle", "boldsymbol", "emph", "mathbb", "mathcal")
_DROP = ("left", "right", "big", "Big", "bigg", "Bigg", "displaystyle", "limits", "nolimits")

_GROUP = r"\{((?:[^{}]|\{[^{}]*\})*)\}"
_FRAC = re.compile(r"\\[dt]?frac\s*" + _GROUP + r"\s*" + _GROUP)
_SQRT = re.compile(r"\\sqrt\s*" + _GROUP)
_BOXED = re.compile(r"\\boxed\s*" + _GROUP)
_WRAP = re.compile(r"\\(?:" + "|".join(_UNWRAP) + r")\s*" + _GROUP)
_POW = re.compile(r"\^\{([^{}]*)\}")
_SUB = re.compile(r"_\{([^{}]*)\}")
_CMD = re.compile(r"\\([A-Za-z]+|[,;! %${}_&#])")
_MATH = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.S)


def _atom(text: str) -> str:
    t = text.strip()
    return t if re.fullmatch(r"\d+(?:\.\d+)?|[A-Za-z]\w*", t) else f"({t})"


def _math(text: str) -> str:
    for _ in range(4):  # nested fractions and boxes, innermost first
        new = _WRAP.sub(lambda m: m.group(1), text)
        new = _FRAC.sub(lambda m: f"{_atom(m.group(1))}/{_atom(m.group(2))}", new)
        new = _SQRT.sub(lambda m: f"√{_atom(m.group(1))}", new)
        new = _BOXED.sub(lambda m: f"[{m.group(1).strip()}]", new)
        if new == text:
            break
        text = new
    text = _POW.sub(lambda m: "^" + _atom(m.group(1)), text)
    text = _SUB.sub(lambda m: "_" + _atom(m.group(1)), text)

    def cmd(m: re.Match[str]) -> str:
        name = m.group(1)
        if name in _DROP:
            return ""
        return _SYMBOLS.get(name, name)

    return _CMD.sub(cmd, text)


def plain_text(text: str) -> str:
    """`text` with its LaTeX as readable plain text (text without LaTeX is returned unchanged).

    >>> plain_text(r"so $\\frac{3}{4} \\times 8 = 6$, answer \\boxed{6}")
    'so 3/4 × 8 = 6, answer [6]'
    """
    if "\\" not in text and "$" not in text:
        return text
    text = _MATH.sub(lambda m: next(g for g in m.groups() if g is not None), text)
    return _math(text)

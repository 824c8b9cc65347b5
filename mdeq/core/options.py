"""Every public option is checked once, here, by a named rule: its type and its range, with a
message that names the option. Solvers declare their rules beside their fields
(``option_rules``), the DEQ layer checks its own with :func:`check_option`."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Rule:
    """What an option must be: an integer or a real number inside [low, high] (ends open where
    asked; ``inf`` allowed only with ``allow_inf``), one of ``choices``, or None if ``optional``."""

    kind: str  # "int" | "real" | "choice"
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    choices: tuple[Any, ...] = ()
    optional: bool = False
    allow_inf: bool = False

    def describe(self) -> str:
        if self.kind == "choice":
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        else:
            what = "an integer" if self.kind == "int" else "a finite number" if not self.allow_inf else "a number"
            lo = "" if self.low == -math.inf else f"{'>' if self.low_open else '>='} {self.low:g}"
            hi = "" if self.high == math.inf else f"{'<' if self.high_open else '<='} {self.high:g}"
            text = what + (" " + " and ".join(p for p in (lo, hi) if p) if lo or hi else "")
        return text + (" (or None)" if self.optional else "")

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if self.kind == "choice":
            return isinstance(value, (str, int, float)) and value in self.choices
        if isinstance(value, bool):
            return False
        if self.kind == "int" and not isinstance(value, numbers.Integral):
            return False
        if not isinstance(value, numbers.Real):
            return False
        v = float(value)
        if math.isnan(v) or (math.isinf(v) and not self.allow_inf):
            return False
        above = v > self.low if self.low_open else v >= self.low
        below = v < self.high if self.high_open else v <= self.high
        return above and below


def integer(low: float = -math.inf, high: float = math.inf, optional: bool = False) -> Rule:
    return Rule("int", low, high, optional=optional)


def real(low: float = -math.inf, high: float = math.inf, *, low_open: bool = False, high_open: bool = False, optional: bool = False, allow_inf: bool = False) -> Rule:
    return Rule("real", low, high, low_open, high_open, optional=optional, allow_inf=allow_inf)


def choice(*options: Any) -> Rule:
    return Rule("choice", choices=tuple(options))


MAX_HISTORY = 1000
"""The largest solver memory (Anderson ``m``, Broyden ``memory``, Krylov dimension) accepted: each
keeps that many state-sized vectors per sample (typical values are 5 to 100)."""


class OptionError(ValueError):
    """An option outside its rule (a ValueError, also for a wrong type: the message says which)."""


def check_option(owner: str, name: str, value: Any, rule: Rule) -> Any:
    """``value`` when ``rule`` accepts it, else :class:`OptionError` naming ``owner`` and ``name``."""
    if not rule.accepts(value):
        raise OptionError(f"{owner} option {name!r} must be {rule.describe()}, got {value!r}")
    return value


def check_options(owner: str, obj: Any, rules: dict[str, Rule]) -> None:
    """Check every attribute of ``obj`` named in ``rules``."""
    for name, rule in rules.items():
        check_option(owner, name, getattr(obj, name), rule)

"""Errors a user can act on: each names its place in the YAML and what is allowed."""
from __future__ import annotations

import difflib
import re
from typing import Iterable

_NEWLINES = re.compile(r"\s*[\r\n]+\s*")


def one_line(text: object) -> str:
    """``text`` on a single line (a wrapped library message joined with spaces)."""
    return _NEWLINES.sub(" ", str(text)).strip()


class TopologyError(ValueError):
    """A mistake in a topology, reported before any training as ``place: message``."""

    def __init__(self, place: str, message: str):
        place, message = one_line(place), one_line(message) or "invalid"
        self.place = place
        self.message = message
        super().__init__(f"{place}: {message}" if place else message)

    def __reduce__(self):  # picklable (Ray workers send errors back)
        return type(self), (self.place, self.message)


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss; names the step, the peer and the term.

    ``epoch`` is the training loop's 0-based index; the message numbers epochs from 1, as the console does."""

    def __init__(self, epoch: int, step: int, peer: str, term: str, value: float, kept: str | None = None):
        self.epoch, self.step, self.peer, self.term, self.value = epoch, step, peer, term, value
        self.kept = kept
        super().__init__(f"diverged at epoch {epoch + 1}, step {step}: peer '{peer}', {term} = {value}"
                         + (f" ({kept})" if kept else ""))

    def __reduce__(self):  # picklable (Ray workers send errors back)
        return type(self), (self.epoch, self.step, self.peer, self.term, self.value, self.kept)

    def keeping(self, kept: str) -> "DivergenceError":
        """The same error, saying what the run directory holds now (the engine knows, the step does not)."""
        return DivergenceError(self.epoch, self.step, self.peer, self.term, self.value, kept)


def suggest(name: str, choices: Iterable[str], what: str) -> str:
    """'unknown X 'name' (did you mean a, b?)' with the closest known names, or the full list."""
    choices = sorted(set(choices))
    name = str(name)
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    if close:
        return f"unknown {what} '{name}' (did you mean {', '.join(close)}?)"
    shown = ", ".join(choices[:40]) + (", …" if len(choices) > 40 else "")
    return f"unknown {what} '{name}' (known: {shown})"

"""Errors a user can act on: each names its place in the YAML and what is allowed."""
from __future__ import annotations

import difflib
from typing import Iterable


class TopologyError(ValueError):
    """A mistake in a topology, reported before any training as ``place: message``."""

    def __init__(self, place: str, message: str):
        self.place = place
        self.message = message
        super().__init__(f"{place}: {message}" if place else message)


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss; names the step, the peer and the term."""

    def __init__(self, epoch: int, step: int, peer: str, term: str, value: float):
        self.epoch, self.step, self.peer, self.term, self.value = epoch, step, peer, term, value
        super().__init__(
            f"diverged at epoch {epoch}, step {step}: peer '{peer}', {term} = {value} "
            "(the last good checkpoint is kept)"
        )


def suggest(name: str, choices: Iterable[str], what: str) -> str:
    """'unknown X 'name' (did you mean a, b?)' with the closest known names, or the full list."""
    choices = sorted(set(choices))
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    if close:
        return f"unknown {what} '{name}' (did you mean {', '.join(close)}?)"
    shown = ", ".join(choices[:40]) + (", …" if len(choices) > 40 else "")
    return f"unknown {what} '{name}' (known: {shown})"

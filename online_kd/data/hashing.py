"""Counter-based random numbers: a pure function of (seed, epoch, sample index, purpose).

Why: the augmentation of a sample and the order of an epoch must not depend on a
global RNG, on which batch or shard a sample lands in, or on how many workers
load it. Every random draw here is a hash of its coordinates instead.

Two levels:

* ``mix64(*words)`` (python ints, splitmix64 chain) turns the scalar coordinates
  (seed, epoch, a purpose string) into a 64-bit key;
* ``sample_uint32(key, index)`` hashes a LongTensor of sample indices under that
  key with two rounds of ``lowbias32`` (C. Wellons' 32-bit integer finaliser).
  It is computed in int64 torch ops whose intermediate values all stay below 2**63
  (32-bit products are split into 16-bit halves), so it never relies on signed
  overflow and gives the same bits on every platform.
"""
from __future__ import annotations

import hashlib

import torch
from torch import Tensor

MASK64 = (1 << 64) - 1
MASK32 = (1 << 32) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15


def splitmix64(x: int) -> int:
    """The splitmix64 finaliser of a 64-bit python int (used for scalar keys)."""
    z = (x + _GOLDEN64) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def _word(w: int | str) -> int:
    """A 64-bit word for an int (any sign) or a string (stable across processes, unlike hash())."""
    if isinstance(w, str):
        return int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
    return int(w) & MASK64


def mix64(*words: int | str) -> int:
    """A 64-bit key that depends on every word and their order."""
    h = 0x6A09E667F3BCC908
    for w in words:
        h = splitmix64(h ^ _word(w))
    return h


def generator_seed(*words: int | str) -> int:
    """A non-negative 63-bit seed for ``torch.Generator.manual_seed``."""
    return mix64(*words) >> 1


def lowbias32_py(x: int) -> int:
    """Reference (pure python) lowbias32 of a 32-bit int; the tensor version must match it."""
    x &= MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    x ^= x >> 16
    return x


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32) without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def lowbias32(x: Tensor) -> Tensor:
    """Elementwise lowbias32 of an int64 tensor holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def sample_uint32(key: int, index: Tensor) -> Tensor:
    """One uniform 32-bit draw (int64 tensor in [0, 2**32)) per element of ``index`` under ``key``."""
    index = index.to(torch.int64)
    k1, k2 = key & MASK32, (key >> 32) & MASK32
    lo, hi = index & MASK32, (index >> 32) & MASK32
    return lowbias32(lowbias32(lo ^ k1) ^ hi ^ k2)


def sample_uint32_py(key: int, index: int) -> int:
    """Reference (pure python) of ``sample_uint32`` for one index."""
    k1, k2 = key & MASK32, (key >> 32) & MASK32
    index &= MASK64
    return lowbias32_py(lowbias32_py((index & MASK32) ^ k1) ^ (index >> 32) ^ k2)


def below(h: Tensor, n: int) -> Tensor:
    """Map uniform 32-bit draws to uniform integers in [0, n) (multiply-shift, n < 2**31)."""
    return (h * n) >> 32

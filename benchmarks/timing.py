"""Interval timing for benchmarks: CUDA events on a GPU (what the device did), ``perf_counter`` on a CPU."""
from __future__ import annotations

import time

import torch


class Interval:
    """``with Interval(device) as t: ...`` then ``t.seconds``: on CUDA, events recorded on the current stream
    around the block and synchronised once at its end, so queued kernels are counted, not just launched."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.seconds = 0.0

    def __enter__(self) -> "Interval":
        if self.cuda:
            self._start, self._end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self._end.record()
            self._end.synchronize()
            self.seconds = self._start.elapsed_time(self._end) / 1e3
        else:
            self.seconds = time.perf_counter() - self._t0

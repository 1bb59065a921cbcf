"""Wall-clock of the sampling loop: CUDA events on a GPU (no sync inside the loop), perf_counter on the CPU."""

from __future__ import annotations

import time

import torch


class Stopwatch:
    """Accumulates the time spent inside ``with stopwatch:`` blocks; ``seconds()`` syncs once, at the end."""

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._elapsed = 0.0

    def __enter__(self) -> "Stopwatch":
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self._events.append((start, end))
        else:
            self._started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self._events[-1][1].record()
        else:
            self._elapsed += time.perf_counter() - self._started

    def seconds(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return sum(start.elapsed_time(end) for start, end in self._events) / 1000.0
        return self._elapsed

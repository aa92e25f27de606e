"""One timed call for the layer benchmarks: CUDA events on a GPU, the host clock on a CPU."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def call_ms(call: Callable[[], object], inputs: list[torch.Tensor]) -> float:
    """Milliseconds of call(), after clearing the gradients of `inputs` (a fresh backward each
    time); on CUDA timed by events around it and a synchronisation after it."""
    for t in inputs:
        t.grad = None
    if inputs[0].is_cuda:
        start, stop = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        call()
        stop.record()
        torch.cuda.synchronize()
        return start.elapsed_time(stop)
    begin = time.perf_counter()
    call()
    return (time.perf_counter() - begin) * 1e3

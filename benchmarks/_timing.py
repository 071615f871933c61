"""Interleaved timing for the benchmarks: variants run in turn, round after round; medians of per-round ratios.

These machines are noisy (shared cores, other jobs): timing the variants in alternation and taking the median of
the per-round ratio against a baseline measured in the same round cancels most of the drift.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def synchronize() -> None:
    """Wait for queued accelerator work (CUDA), so a timing covers what the call launched."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes, accelerator work included."""
    synchronize()
    t0 = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - t0


def interleave(variants: dict[str, Callable[[], object]], rounds: int, *, warmup: int = 1) -> dict[str, list[float]]:
    """``rounds`` timings of each variant, taken in turn (one of each per round) after ``warmup`` untimed rounds."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    for _ in range(rounds):
        for name, fn in variants.items():
            times[name].append(timed(fn))
    return times


def ratios(times: dict[str, list[float]], base: str) -> dict[str, float]:
    """Median over rounds of each variant's time / the baseline's time in the same round."""
    return {k: statistics.median(a / b for a, b in zip(v, times[base], strict=True)) for k, v in times.items()}


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3

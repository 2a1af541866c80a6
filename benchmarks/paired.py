"""Tests of paired differences for small benchmark samples (a few dozen tasks)."""

from __future__ import annotations

import math

import numpy as np


def sign_test(wins: int, losses: int) -> float:
    """Two-sided binomial p of ``wins`` against ``losses`` (ties dropped) under even odds."""
    n = wins + losses
    if not n:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return round(min(1.0, 2 * tail), 4)


def sign_flip_p(diff: list[float], draws: int = 100_000, seed: int = 0) -> float:
    """Two-sided p of a paired mean difference: how often flipping each pair's sign at random
    gives a mean at least as far from zero (seeded Monte Carlo)."""
    d = np.asarray(diff, float)
    if not np.isfinite(d).all():
        raise ValueError("a paired difference is not a number")
    flips = np.random.default_rng(seed).choice([-1.0, 1.0], size=(draws, d.size))
    return round(float(np.mean(np.abs(flips @ d) >= abs(d.sum()) - 1e-9)), 4)

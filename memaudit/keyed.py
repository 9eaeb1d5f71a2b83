"""Counter-based random draws keyed on (seed, example id, index): a pure function of the keys.

The same example gets the same draws in every epoch, process, batch and device, so results do
not depend on which examples share a batch or on which process ran an example (example-tied
dropout's masks, the scan's noise and random scores).
"""

from __future__ import annotations

import math

import torch

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def mix32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finalizer (lowbias32) on int64 tensors; bijective on [0, 2^32)."""
    h = h & _M32
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _M32  # int64 products may wrap; their low 32 bits stay exact
    h = h ^ (h >> 15)
    h = (h * 0x846CA68B) & _M32
    return h ^ (h >> 16)


def key(seed: int) -> int:
    """A 32-bit key of a (64-bit) seed."""
    return int(mix32(torch.tensor([seed & _M32])) ^ mix32(torch.tensor([seed >> 32]) + _GOLDEN))


def subseed(seed: int, stream: int) -> int:
    """The seed of stream ``stream`` of ``seed`` (a layer, a step)."""
    return int(mix32(torch.tensor([key(seed) ^ int(mix32(torch.tensor([stream + 1])))])))


def draws(ids: torch.Tensor, units: torch.Tensor, *, seed: int) -> torch.Tensor:
    """Uniform 32-bit integer draws ``[B, M]`` keyed on ``(seed, id, unit)``.

    Example:
        >>> a = draws(torch.tensor([7, 8]), torch.arange(4), seed=0)
        >>> torch.equal(a, draws(torch.tensor([7, 8]), torch.arange(4), seed=0))
        True
    """
    ids = ids.to(torch.int64)
    h_id = mix32(mix32(ids ^ key(seed)) + ((ids >> 32) & _M32) * _GOLDEN)
    h_unit = mix32(units.to(device=ids.device, dtype=torch.int64) * _GOLDEN + 0x632BE5AB)
    return mix32(h_id[:, None] ^ h_unit[None, :])


def uniform(ids: torch.Tensor, n: int, *, seed: int) -> torch.Tensor:
    """Floats in (0, 1), ``[B, n]``, keyed on ``(seed, id, column)``."""
    bits = draws(ids, torch.arange(n, device=ids.device), seed=seed)
    return (bits.double() + 0.5).div(2**32).float()


def normal(ids: torch.Tensor, n: int, *, seed: int) -> torch.Tensor:
    """Standard normal floats ``[B, n]`` keyed on ``(seed, id, column)`` (Box-Muller)."""
    half = (n + 1) // 2
    u = uniform(ids, 2 * half, seed=seed).double()
    radius = torch.sqrt(-2 * torch.log(u[:, :half]))
    angle = 2 * math.pi * u[:, half:]
    return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], 1)[:, :n].float()

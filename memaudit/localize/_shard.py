"""A scan over several processes (``torchrun``): which ids each rank searches, and the results
brought together. Every rank draws the same reference and evaluation rows and searches each id
as a single process would (random draws are keyed on the id), so the merged report is the
single-process report."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from memaudit.data import ImageDataset
from memaudit.engine import logits_of
from memaudit.models import Classifier
from memaudit.schema import ExampleResult


@dataclass(frozen=True)
class World:
    """This process's rank among ``size`` (1: a single process)."""

    rank: int = 0
    size: int = 1

    @classmethod
    def current(cls) -> World:
        """The initialized process group's (``torchrun``), else a single process."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()


def shard(costs: torch.Tensor, world: int) -> list[torch.Tensor]:
    """The positions each of ``world`` ranks takes, balancing the expected ``costs``: sorted
    dearest first and dealt out in a snake (0, 1, ..., w-1, w-1, ..., 0), so every rank gets
    the same mix of dear and cheap ids. Each position goes to exactly one rank, in order.

    Example:
        >>> [s.tolist() for s in shard(torch.tensor([5.0, 1.0, 4.0, 0.0, 3.0]), 2)]
        [[0, 1, 3], [2, 4]]
    """
    order = torch.argsort(-costs.double(), stable=True)
    k = torch.arange(len(order))
    turn, seat = k // world, k % world
    rank = torch.where(turn % 2 == 0, seat, world - 1 - seat)
    return [order[rank == r].sort().values for r in range(world)]


def expected_cost(
    model: Classifier, data: ImageDataset, rows: torch.Tensor, *, device: torch.device
) -> torch.Tensor:
    """A cost guess per row, from one forward: 0 for a row the model gets wrong (it is not
    searched), else 1 + the margin of its label (a prediction held with a wide margin takes
    more units to flip)."""
    if not len(rows):
        return torch.zeros(0)
    logits = logits_of(model, data, rows, device=device)
    labels = data.labels[rows]
    given = logits.gather(1, labels[:, None])[:, 0]
    others = logits.scatter(1, labels[:, None], float("-inf")).max(1).values
    margin = given - others
    return torch.where(margin > 0, 1 + margin, torch.zeros_like(margin))


def gather(
    results: Sequence[ExampleResult], world: World, *, failed: bool = False
) -> tuple[list[ExampleResult], list[int]]:
    """Every rank's ``results`` on every rank, and the ranks that say they ``failed`` (a
    collective: every rank calls it, also one whose search raised)."""
    if world.size == 1:
        return list(results), [0] if failed else []
    parts: list[tuple[bool, list[str]] | None] = [None] * world.size
    dist.all_gather_object(parts, (failed, [r.model_dump_json() for r in results]))
    found = [ExampleResult.model_validate_json(r) for p in parts if p for r in p[1]]
    return found, [rank for rank, p in enumerate(parts) if p and p[0]]

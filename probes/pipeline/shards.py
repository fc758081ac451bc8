"""Many processes writing one cache: the rank split used by `write_traces` under torchrun.

`torchrun --nproc-per-node N -m probes.run cache|lhat|updates ...` (or `accelerate launch`) starts
N copies of the command with the torch.distributed environment (`RANK`, `WORLD_SIZE`,
`MASTER_ADDR`, `MASTER_PORT`). Each copy takes every N-th trace of the input (trace i goes to rank
i mod N, after the checks that apply to the whole input), writes its own segments (shard `r<rank>`)
into the one store at `--out`, and rank 0 rewrites the index over every shard at the end, so the
file at `--out` reads as one cache. On GPUs, `--device cuda` (or `auto`) means the rank's own GPU,
`cuda:<LOCAL_RANK>`. Without those variables (or with `WORLD_SIZE=1`) nothing changes.

The ranks meet three times (gloo barriers, on the CPU whatever the compute device): after the
input checks (before anyone creates `--out`), after rank 0 has opened the store, and before rank 0
writes the final index.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from probes.errors import ProbesError

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """This process's place in a distributed run.

    Attributes:
        rank: 0 .. world - 1.
        world: Number of processes.
    """

    rank: int
    world: int
    local_rank: int = 0

    @property
    def name(self) -> str:
        """The segment shard name of this rank, e.g. "r1"."""
        return f"r{self.rank}"

    def take(self, items: Sequence[T]) -> list[T]:
        """Every `world`-th item starting at `rank` (deterministic, balanced)."""
        return list(items[self.rank::self.world])

    def pin_gpu(self) -> None:
        """Make `cuda` (without an index) mean this rank's GPU, `cuda:<LOCAL_RANK>` (no-op on CPU)."""
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank % torch.cuda.device_count())

    def barrier(self) -> None:
        """Wait for every rank (initialises a gloo process group on first use)."""
        import torch.distributed as dist

        global _OWN_GROUP
        if not dist.is_initialized():
            dist.init_process_group("gloo")
            _OWN_GROUP = True
        dist.barrier()

    def finish(self) -> None:
        """Tear down the process group this module started (none if it was started elsewhere)."""
        import torch.distributed as dist

        global _OWN_GROUP
        if _OWN_GROUP and dist.is_initialized():
            dist.destroy_process_group()
        _OWN_GROUP = False


_OWN_GROUP = False


def current_shard(env: Mapping[str, str] | None = None) -> Shard | None:
    """The `Shard` of this process from torch.distributed's variables, or None (one process).

    Raises:
        ProbesError: `RANK` / `WORLD_SIZE` set but not integers with 0 <= RANK < WORLD_SIZE.
    """
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env:
        return None
    try:
        world, rank = int(env["WORLD_SIZE"]), int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ProbesError(f"WORLD_SIZE={env.get('WORLD_SIZE')!r} / RANK={env.get('RANK')!r} "
                          f"are not integers; start several processes with torchrun "
                          f"--nproc-per-node N, or unset them") from None
    if world < 1 or not 0 <= rank < world:
        raise ProbesError(f"RANK={rank} is not in [0, WORLD_SIZE={world}); start several "
                          f"processes with torchrun --nproc-per-node N, or unset them")
    return Shard(rank=rank, world=world, local_rank=local) if world > 1 else None


def describe(shard: Shard | None) -> dict[str, Any]:
    """JSON-able description for `WriteResult` ({} for one process)."""
    return {} if shard is None else {"rank": shard.rank, "world_size": shard.world}

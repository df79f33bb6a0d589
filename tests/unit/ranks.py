"""Two gloo ranks in spawned processes, for the unit tests of collective code (torch.multiprocessing).

`spawn_two(fn, *args)` runs fn(rank, port, *args) on ranks 0 and 1 (a free port on 127.0.0.1);
inside fn, `join(rank, port)` starts the process group and `leave()` ends it. `leave` passes a
barrier first: a rank that destroys its group while its peer still reads the last bytes of a
collective closes the socket under it, and gloo then aborts the peer ("terminate called without an
active exception", SIGABRT: seen once in test_objectives_alignment).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from tests.services import free_port


def spawn_two(fn: Callable[..., None], *args: Any) -> None:
    import torch.multiprocessing as mp

    mp.spawn(fn, args=(free_port(), *args), nprocs=2, join=True)


def join(rank: int, port: int) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)


def leave() -> None:
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()

"""One merge in several processes (``torchrun``): shards of the calibration images, sums across ranks.

Every statistic zipit collects is a sum (the correlation moments, the BatchNorm sums), so it splits
over shards of the images exactly: each rank streams its own contiguous shard and the sums are
all-reduced in float64. What follows the sums (matching, zipping) is then the same on every rank;
tuning candidates are spread over the ranks; rank 0 alone writes. Without torchrun's environment
(``WORLD_SIZE`` unset or 1) a single process does everything and no collective is ever called.
"""
from __future__ import annotations

import datetime
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import torch

from .errors import ZipitError

T = TypeVar("T")
TIMEOUT = datetime.timedelta(minutes=30)    # a rank that waits longer for the others gives up
JOIN_SECONDS = 120          # joining the group: torchrun starts every process at once, so a peer that is
                            # not there by then is not coming (a stray WORLD_SIZE); ZIPIT_JOIN_TIMEOUT overrides


class PeerError(ZipitError):
    """Another rank failed; this one stops with that rank's message."""


@dataclass
class Ranks:
    """This process's place in the job: rank ``rank`` of ``world``; ``waited`` counts the seconds
    spent in collectives (communication, and waiting for the slowest rank)."""

    rank: int = 0
    world: int = 1
    backend: str = "gloo"
    waited: float = field(default=0.0, compare=False)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def many(self) -> bool:
        return self.world > 1

    def shard(self, items: list[T], unit: int) -> list[T]:
        """This rank's contiguous share of ``items``, in whole runs of ``unit`` (a batch), so that
        images are batched as in one process: no item twice, none dropped, no padding."""
        runs = -(-len(items) // unit)
        lo, hi = runs * self.rank // self.world, runs * (self.rank + 1) // self.world
        return items[lo * unit:hi * unit]

    def owns(self, index: int) -> bool:
        """Whether this rank does item ``index`` of work that is dealt out round-robin."""
        return index % self.world == self.rank

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of ``t`` over all ranks, in float64, on ``t``'s device."""
        if not self.many:
            return t.double()
        start = time.perf_counter()
        x = t.detach().double()
        x = x.cpu() if self.backend == "gloo" else x.contiguous()
        torch.distributed.all_reduce(x)
        self.waited += time.perf_counter() - start
        return x.to(t.device)

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``t`` on every rank."""
        if not self.many:
            return t
        start = time.perf_counter()
        x = t.detach().clone()
        x = x.cpu() if self.backend == "gloo" else x.contiguous()
        torch.distributed.broadcast(x, 0)
        self.waited += time.perf_counter() - start
        return x.to(t.device)

    def together(self, work: Callable[[], T]) -> T:
        """Run ``work`` on every rank, then end every rank if it failed on any: the failing rank
        raises its own error, the others its message (rank 0 prints it). Called before each
        collective, so that no rank waits for one that has died."""
        if not self.many:
            return work()
        failure = None
        try:
            value = work()
        except BaseException as exc:       # noqa: B036  (Ctrl-C too: the others must not wait)
            failure = exc
        summary = None if failure is None else _summary(failure)
        summaries = [None] * self.world
        start = time.perf_counter()
        torch.distributed.all_gather_object(summaries, summary)
        self.waited += time.perf_counter() - start
        failed = [(r, s) for r, s in enumerate(summaries) if s is not None]
        if failure is not None:
            raise failure
        if failed:
            rank, (message, hint, code) = failed[0]
            error = PeerError(f"rank {rank} of {self.world}: {message}", hint)
            error.exit_code = code
            raise error
        return value


SINGLE = Ranks()       # alone: nothing to wait for, so the shared instance stays at 0 s


def _summary(exc: BaseException) -> tuple[str, str | None, int]:
    if isinstance(exc, ZipitError):
        return exc.message, exc.hint, exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", "nothing was written", 130
    return f"internal error: {exc.__class__.__name__}: {str(exc)[:300]}", "rerun with --debug for the traceback", 1


def ranks_from_env(device: str = "cpu", on_wait: Callable[[str], None] | None = None) -> Ranks:
    """Join the process group that torchrun describes in the environment, or run alone.

    ``gloo`` on CPU, ``nccl`` with a CUDA device (one per rank: ``LOCAL_RANK``). ``on_wait`` hears
    what the join waits for. The join gives up after ``JOIN_SECONDS`` and can be interrupted
    (SIGINT, SIGTERM) while it waits: it runs on a thread, the main thread only waits for it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    import torch.distributed as dist

    cuda = device.startswith("cuda")
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        _join(backend, world, on_wait)
    return Ranks(dist.get_rank(), dist.get_world_size(), backend)


def _join(backend: str, world: int, on_wait: Callable[[str], None] | None) -> None:
    import torch.distributed as dist

    try:
        seconds = float(os.environ.get("ZIPIT_JOIN_TIMEOUT", JOIN_SECONDS))
    except ValueError:
        raise ZipitError(f"ZIPIT_JOIN_TIMEOUT {os.environ['ZIPIT_JOIN_TIMEOUT']!r} is not a number of seconds",
                         "set it to e.g. 300, or unset it") from None
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    env = f"WORLD_SIZE={world}, RANK={os.environ.get('RANK', '?')}"
    if on_wait:
        on_wait(f"joining {world} processes at {where} ({env}); giving up after {seconds:g} s")
    outcome: dict[str, BaseException] = {}

    def join() -> None:
        try:
            dist.init_process_group(backend, timeout=TIMEOUT)
        except BaseException as exc:    # handed to the main thread
            outcome["error"] = exc

    thread = threading.Thread(target=join, name="zipit-join", daemon=True)
    thread.start()
    thread.join(seconds)            # the main thread waits here, where signals reach it
    if thread.is_alive():
        raise ZipitError(f"no other process joined within {seconds:g} s at {where} ({env} in the environment)",
                         "start every process with torchrun, or unset WORLD_SIZE and RANK to merge in one process")
    if "error" in outcome:
        raise ZipitError(f"cannot join the {world} processes torchrun started: {str(outcome['error'])[:200]}",
                         "check torchrun's rendezvous options (--rdzv-endpoint, --nnodes)")


def leave(ranks: Ranks) -> None:
    """Leave the process group (the end of a distributed command)."""
    if ranks.many and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()

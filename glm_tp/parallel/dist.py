"""Process groups and the few collectives tensor parallelism needs.

`TPContext` is what every layer holds: its rank, the group size and the group (by a weak reference, so that
`shutdown` destroys the group while the interpreter is alive, see there). A context with
`simulated=True` pretends to be one rank of a larger group and turns collectives into no-ops
(used by the single-GPU benchmark of a TP=8 rank). Collectives time out instead of hanging:
the timeout is given to `init_process_group` and applies to every call on the group.
"""
from __future__ import annotations

import atexit
import ctypes
import datetime
import os
import re
import signal
import socket
import sys
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 60.0
_peers: list[tuple[str, int]] = []  # (host, pid) of every rank, in rank order, once the group is joined


@dataclass
class TPContext:
    rank: int = 0
    size: int = 1
    group_ref: Callable[[], Any] | None = None  # the process group (weakref.ref), None: the default group
    device: torch.device = torch.device("cpu")
    simulated: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S  # every collective's limit (idle ranks need keep-alives more often)

    @property
    def group(self) -> Any:
        return self.group_ref() if self.group_ref is not None else None

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def communicates(self) -> bool:
        return self.size > 1 and not self.simulated

    # -- collectives ---------------------------------------------------------------------
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.communicates:
            dist.all_reduce(t, group=self.group)
        return t

    def gather_last_dim_to_first(self, t: torch.Tensor) -> torch.Tensor | None:
        """Concatenate every rank's `t` along the last dim on rank 0; other ranks get None."""
        if not self.communicates:
            return t
        t = t.contiguous()
        if self.device.type == "cpu":
            parts = [torch.empty_like(t) for _ in range(self.size)] if self.rank == 0 else None
            dist.gather(t, parts, group=self.group, group_dst=0)  # the group's first rank
        else:  # NCCL has no gather in older versions; all_gather is one call and cheap for logits
            parts = [torch.empty_like(t) for _ in range(self.size)]
            dist.all_gather(parts, t, group=self.group)
        return torch.cat(parts, dim=-1) if self.rank == 0 else None

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        if self.communicates:
            dist.broadcast(t, group=self.group, group_src=0)
        return t

    def broadcast_object(self, obj: Any = None) -> Any:
        """Send a picklable object from rank 0 to every rank; returns it on all ranks."""
        if not self.communicates:
            return obj
        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, group=self.group, group_src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's picklable `obj`, in rank order, on every rank."""
        if not self.communicates:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out


def single_process(device: str | torch.device = "cpu") -> TPContext:
    return TPContext(device=torch.device(device))


def simulated_rank(size: int, rank: int = 0, device: str | torch.device = "cpu") -> TPContext:
    """One rank of a `size`-way group, alone on this device, with collectives as no-ops."""
    return TPContext(rank=rank, size=size, device=torch.device(device), simulated=True)


def die_with_launcher() -> None:
    """Under torchrun, have the kernel send this rank SIGTERM when the launcher dies (even by SIGKILL), so
    no rank outlives it: each rank then ends as on a SIGTERM from torchrun (rank 0 finishes the work in
    flight and shuts the others down). Linux only; elsewhere nothing is done. A plain run is left alone: its
    parent is a shell, which a user may leave on purpose (nohup)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    launcher = os.getppid()
    PR_SET_PDEATHSIG = 1
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return
    if os.getppid() != launcher:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def init_distributed(device: str | None = None, backend: str | None = None,
                     timeout_s: float = DEFAULT_TIMEOUT_S) -> TPContext:
    """Join the torchrun group (or stay single-process when WORLD_SIZE is unset).

    The backend follows the device: nccl for CUDA, gloo for CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(f"cuda:{local_rank}" if device == "cuda" else device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world == 1 and not dist.is_initialized():
        return TPContext(device=dev, timeout_s=timeout_s)
    if not dist.is_initialized():
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        atexit.register(shutdown)
        _peers[:] = [tuple(p) for p in _all_gather((socket.gethostname(), os.getpid()))]
    return TPContext(rank=dist.get_rank(), size=dist.get_world_size(), group_ref=weakref.ref(dist.group.WORLD),
                     device=dev, timeout_s=timeout_s)


def _all_gather(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


_SOURCE_LOCATION = re.compile(r"\[[^\]]*\.(?:cc|cpp|cu|h|hpp):\d+\]\s*")


def failure_line(e: BaseException) -> str:
    """A failed collective in one line, without the library's source locations (its build paths)."""
    text = _SOURCE_LOCATION.sub("", str(e)).strip()
    return text.splitlines()[0] if text else type(e).__name__


def stop_peers() -> list[int]:
    """After a collective failed: kill the other ranks on this host. The group is broken for good, and a
    rank that hangs (stopped, stuck in a driver) would otherwise hold the launcher for its own grace period
    (torchrun waits 30 s before it kills). Returns the pids signalled."""
    host, me, stopped = socket.gethostname(), os.getpid(), []
    for peer_host, pid in _peers:
        if peer_host == host and pid != me:
            try:
                os.kill(pid, signal.SIGKILL)
                stopped.append(pid)
            except (ProcessLookupError, PermissionError):
                pass  # gone already
    _peers.clear()
    return stopped


def shutdown() -> None:
    """Leave the process groups together, and destroy them while the interpreter is alive (at exit).

    A rank that tears down its gloo connections while a peer still uses them can make that peer abort at
    exit, and so can a group that outlives the interpreter: its worker threads release the tensors of the
    last collectives, and one that drops the last reference to a Python tensor after Python has finalized
    takes the GIL, is ended by pthread_exit and aborts the process ("terminate called without an active
    exception"; seen about 1 run in 20 on a loaded 2-core machine). So contexts hold their groups weakly:
    `destroy_process_group` drops the last strong references, and each group's destructor joins its
    threads here. A rank that is gone already only delays this by a few seconds."""
    if not dist.is_initialized():
        return
    if dist.get_backend() == "gloo":
        try:
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=5))
        except RuntimeError:
            pass  # a peer has gone: nothing left to wait for
    dist.destroy_process_group()

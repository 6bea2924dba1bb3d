"""Run a function on N in-process ranks (torch.multiprocessing + gloo): no torchrun start-up cost."""
from __future__ import annotations

import io
import os
import socket
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    import torch
    torch.set_num_threads(1)
    from glm_tp.parallel.dist import init_distributed, shutdown
    try:
        tp = init_distributed("cpu", timeout_s=60)
        buf = io.BytesIO()  # tensors travel as bytes: shared-memory handles die with the child
        torch.save(fn(tp, *args), buf)
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        queue.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        shutdown()


def run_ranks(world: int, fn: Callable, *args: Any, timeout: float = 120) -> list[Any]:
    """fn(tp, *args) on every rank; returns the per-rank results in rank order, or raises."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors = []
    for _ in range(world):
        rank, status, value = queue.get()
        if status == "ok":
            results[rank] = torch.load(io.BytesIO(value), weights_only=False)
        else:
            errors.append(f"rank {rank}: {value}")
    for p in procs:
        p.join(timeout)
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world)]


def greedy_blank(model, blank, steps: int, position_dims: int = 1,
                 pick: Callable | None = None) -> tuple[list[int], list[torch.Tensor], Any]:
    """One blank decoded through the engine's Decoder, rank 0 picking each token (`pick(logits, tokens so
    far)`, greedy by default) and every rank following: the answer's tokens, the logits each pick saw
    (rank 0; empty elsewhere) and the logits after the last token (None off rank 0)."""
    from glm_tp.engine.decoder import Decoder

    pick = pick or (lambda logits, seq: int(logits.argmax()))
    decoder = Decoder(model, max_rows=1, graphs=False, position_dims=position_dims)
    logits = decoder.prefill(torch.tensor([blank.tokens]), torch.tensor([blank.positions]),
                             torch.tensor([blank.bidirectional]), torch.tensor([blank.next_position]),
                             torch.tensor([blank.counting]))
    seq, seen = list(blank.tokens), []
    for _ in range(steps):
        token = torch.zeros(1, dtype=torch.long)
        if logits is not None:
            seen.append(logits[0].clone())
            token[0] = pick(logits[0], seq)
        model.tp.broadcast(token)
        seq.append(int(token))
        logits = decoder.step(token)
    return seq[len(blank.tokens):], seen, logits

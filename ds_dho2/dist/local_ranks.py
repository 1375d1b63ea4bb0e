"""Launch real gloo ranks on this machine (tests, benchmarks, the demo), with a timeout that names the
ranks that hung.

``run_ranks(fn, world_size, *args)`` starts ``world_size`` spawned processes; each sets the torchrun-style
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), calls
``fn(rank, world_size, *args)`` and sends back its (picklable) return value. A rank's exception is
re-raised in the caller with that rank's traceback.
"""

from __future__ import annotations

import io
import os
import socket
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(fn: Callable[..., Any], rank: int, world_size: int, port: int, args: tuple, queue: Any) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    try:
        result = fn(rank, world_size, *args)
        buffer = io.BytesIO()
        torch.save(result, buffer)  # bytes, not shared-memory tensors that vanish when this rank exits
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 600) -> list[Any]:
    """Run ``fn`` on ``world_size`` gloo ranks; return the per-rank results in rank order."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    processes = [context.Process(target=_rank_main, args=(fn, rank, world_size, port, args, queue), daemon=False)
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    try:
        for _ in range(world_size):
            try:
                rank, status, payload = queue.get(timeout=timeout)
            except Exception as error:  # queue.Empty
                hung = sorted(set(range(world_size)) - set(results) - set(errors))
                raise TimeoutError(f"ranks {hung} did not finish within {timeout:.0f} s") from error
            (results if status == "ok" else errors)[rank] = payload
            if errors:
                break
    finally:
        for process in processes:
            process.join(timeout=30 if not errors else 2)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
    if errors:
        rank = min(errors)
        raise RuntimeError(f"rank {rank} failed:\n{errors[rank]}")
    return [torch.load(io.BytesIO(results[rank]), weights_only=False) for rank in range(world_size)]

"""Loud failures instead of hangs: process-group setup with timeouts, a heartbeat per rank, and
the error that names the rank that was lost.

A collective that loses a peer either fails at once (gloo sees the peer's socket close) or waits
until the process group's timeout. Neither tells *which* rank is gone: the socket error names an
address, the timeout nobody. Every rank therefore bumps a counter ``smoe/hb/RANK`` in the
rendezvous store twice a second from a daemon thread; when a collective fails, the survivors read
the counters twice, a few heartbeats apart, and the ranks whose counter stood still are the lost
ones. If the store itself is unreachable, the rank hosting it (rank 0 outside torchrun) is lost.
Under torchrun the store belongs to the launcher's agent, which also stops the other workers
when one dies; these errors are for process groups started without it (and for what torchrun
reports).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["RankLostError", "init_process_group", "shutdown", "Heartbeat", "lost_ranks",
           "guarded", "check_same_across_ranks", "collective_device"]


class RankLostError(RuntimeError):
    """A peer of this rank stopped answering (killed, crashed or hung)."""


_STATE: dict = {}


def init_process_group(backend: str = "gloo", *, rank: int | None = None,
                       world_size: int | None = None, addr: str | None = None,
                       port: int | None = None, timeout_s: float = 60.0) -> None:
    """Join the default process group (env of torchrun when arguments are None: RANK,
    WORLD_SIZE, MASTER_ADDR, MASTER_PORT) with a timeout on the rendezvous and on every
    collective, and start this rank's heartbeat."""
    env = os.environ
    try:
        rank = int(env["RANK"]) if rank is None else rank
        world_size = int(env["WORLD_SIZE"]) if world_size is None else world_size
        addr = env.get("MASTER_ADDR", "127.0.0.1") if addr is None else addr
        port = int(env["MASTER_PORT"]) if port is None else port
    except KeyError as exc:
        raise RuntimeError(f"no rendezvous: {exc.args[0]} is not set; launch with torchrun "
                           "(torchrun --nproc_per_node P -m smoe ...) or pass rank, world_size, "
                           "addr and port") from None
    agent_store = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    timeout = timedelta(seconds=timeout_s)
    try:
        store = dist.TCPStore(addr, port, world_size, is_master=(rank == 0 and not agent_store),
                              timeout=timeout, wait_for_workers=False)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=timeout)
    except (RuntimeError, dist.DistStoreError) as exc:
        raise RuntimeError(f"rendezvous at {addr}:{port} failed for rank {rank} of {world_size} "
                           f"within {timeout_s:g}s (are all {world_size} ranks started, with "
                           f"the same address?): {str(exc).splitlines()[0]}") from None
    _STATE["store"] = store
    _STATE["heartbeat"] = Heartbeat(store, rank)


def shutdown() -> None:
    """Stop the heartbeat (joined, so no thread touches the store at exit) and leave the
    process group."""
    hb = _STATE.pop("heartbeat", None)
    if hb is not None:
        hb.stop()
    if dist.is_initialized():
        dist.barrier()  # nobody tears down the store while another rank still reads it
        dist.destroy_process_group()
    _STATE.pop("store", None)


class Heartbeat:
    """Bumps ``smoe/hb/RANK`` in the store every ``period_s`` from a daemon thread."""

    def __init__(self, store, rank: int, period_s: float = 0.5) -> None:
        self.store, self.rank, self.period_s = store, rank, period_s
        self._stop = threading.Event()
        self.store.add(f"smoe/hb/{rank}", 1)
        self._thread = threading.Thread(target=self._run, name=f"smoe-heartbeat-{rank}",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.store.add(f"smoe/hb/{self.rank}", 1)
            except Exception:  # the store is gone: the collectives will say so
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def lost_ranks(world_size: int, wait_s: float = 2.5) -> list[int]:
    """Ranks whose heartbeat did not advance within ``wait_s`` (empty when all are alive)."""
    store = _STATE.get("store")
    if store is None:
        return []
    keys = [f"smoe/hb/{r}" for r in range(world_size)]
    try:
        before = [store.add(k, 0) for k in keys]
        time.sleep(wait_s)
        after = [store.add(k, 0) for k in keys]
    except Exception:  # the store's host is gone
        return [0]
    me = dist.get_rank() if dist.is_initialized() else -1
    return [r for r in range(world_size) if after[r] == before[r] and r != me]


def guarded(what: str, fn, *args, **kwargs):
    """Run a collective; on failure raise :class:`RankLostError` naming the lost ranks."""
    try:
        return fn(*args, **kwargs)
    except RankLostError:
        raise
    except Exception as exc:  # gloo raises RuntimeError or DistBackendError
        if not dist.is_initialized():
            raise
        lost = lost_ranks(dist.get_world_size())
        who = (f"lost rank {', '.join(map(str, lost))}" if lost
               else "no rank is known lost (a timeout or a mismatched call)")
        raise RankLostError(f"{what} failed on rank {dist.get_rank()}: {who} "
                            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                            ) from exc


def collective_device(group=None) -> torch.device:
    """Where this group's collectives take tensors: the current CUDA device under NCCL, else the
    CPU (gloo)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_same_across_ranks(what: str, value: str, group=None) -> None:
    """One-line ValueError when ``value`` (a config fingerprint) differs between ranks."""
    digest = torch.frombuffer(bytearray(hashlib.sha256(value.encode()).digest()),
                              dtype=torch.uint8).to(torch.int64).to(collective_device(group))
    values = [torch.empty_like(digest) for _ in range(dist.get_world_size(group))]
    guarded(f"comparing {what} across ranks", dist.all_gather, values, digest, group=group)
    if any(not torch.equal(v, values[0]) for v in values):
        odd = [r for r, v in enumerate(values) if not torch.equal(v, values[0])]
        raise ValueError(f"{what} differs across ranks: rank(s) {odd} disagree with rank 0; "
                         "start every rank with the same model and parallel settings")

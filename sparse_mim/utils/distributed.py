"""torch.distributed set-up for torchrun, Slurm (srun) and a plain single process.

One code path for all three: ``init_distributed()`` reads the launcher's variables,
picks the device, and (for more than one process) starts the process group; with
one process nothing is started and the helpers below degrade to no-ops, so the
training loop never branches on "distributed or not".

- torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.
- Slurm's srun sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID / SLURM_NODELIST;
  MASTER_ADDR becomes the first host of the node list (parsed here, no scontrol),
  MASTER_PORT defaults to 29500 + (SLURM_JOB_ID mod 1000) unless already set.
- On CUDA, ``torch.cuda.set_device(local_rank)`` runs before anything else touches
  CUDA (spconv assumes the current device; see docs/sparse_engine.md); backend nccl.
  On CPU: gloo.

Dead peers: ``timeout_s`` (config ``train.dist_timeout``, default 600 s instead of torch's
1800 s) bounds every collective, and ``check_peers`` (called by the trainers at the start
of every optimizer step) is a monitored barrier on a gloo group: when a rank hangs or dies,
the others stop within the timeout with ``DeadPeerError`` naming the rank(s) that did not
answer, instead of waiting silently.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import random
import re
import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "DistInfo", "init_distributed", "parse_slurm_nodelist", "launcher_env", "get_rank", "get_world_size",
    "is_main_process", "is_distributed", "barrier", "any_rank", "all_reduce_mean", "all_reduce_sum", "all_gather_rows",
    "seed_everything", "cleanup", "check_peers", "DeadPeerError",
]

_MONITOR: dict = {"group": None, "timeout_s": 1800.0}


class DeadPeerError(RuntimeError):
    """Some ranks did not reach a synchronisation point within the timeout (the message names them)."""


@dataclasses.dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    launcher: str = "none"  # "torchrun", "slurm" or "none"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _expand_range(prefix: str, body: str, suffix: str) -> list[str]:
    hosts = []
    for part in body.split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            width = len(lo)
            for n in range(int(lo), int(hi) + 1):
                hosts.append(f"{prefix}{n:0{width}d}{suffix}")
        else:
            hosts.append(f"{prefix}{part}{suffix}")
    return hosts


def parse_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand Slurm's compressed host list without scontrol.

    Handles the usual forms: ``node01``, ``node[01-04]``, ``gpu[1,3-5],cpu7``,
    ``rack1-node[08-09]``. (Several bracket groups in one name are not expanded.)
    """
    hosts, token, depth, parts = [], "", 0, []
    # split on commas that are outside brackets
    for ch in nodelist.strip():
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(token)
            token = ""
        else:
            token += ch
    if token:
        parts.append(token)
    for part in parts:
        m = re.fullmatch(r"([^\[\]]*)\[([^\[\]]+)\]([^\[\]]*)", part)
        if m:
            hosts.extend(_expand_range(*m.groups()))
        elif part:
            hosts.append(part)
    return hosts


def launcher_env(environ=None) -> dict:
    """Read rank/world/local rank and the rendezvous address from torchrun or Slurm variables.

    Returns a dict with rank, world_size, local_rank, launcher and, for Slurm, the
    MASTER_ADDR / MASTER_PORT to use. Does not touch the process environment.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return dict(rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
                    local_rank=int(env.get("LOCAL_RANK", 0)), launcher="torchrun",
                    master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=env.get("MASTER_PORT", "29500"))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        hosts = parse_slurm_nodelist(env.get("SLURM_STEP_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1")))
        port = env.get("MASTER_PORT") or str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 1000)
        return dict(rank=int(env["SLURM_PROCID"]), world_size=int(env["SLURM_NTASKS"]),
                    local_rank=int(env.get("SLURM_LOCALID", 0)), launcher="slurm",
                    master_addr=env.get("MASTER_ADDR") or (hosts[0] if hosts else "127.0.0.1"), master_port=port)
    return dict(rank=0, world_size=1, local_rank=0, launcher="none", master_addr=None, master_port=None)


def init_distributed(device: str = "auto", backend: str | None = None, timeout_s: int = 1800) -> DistInfo:
    """Initialise from the launcher's variables; returns the process's rank/world/device.

    ``device``: "auto" (CUDA if available, else CPU), "cuda" or "cpu".
    """
    info = launcher_env()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda requested but torch sees no GPU; use device=cpu (or auto)")
        # must happen before spconv / NCCL touch CUDA (see docs/sparse_engine.md)
        torch.cuda.set_device(info["local_rank"] % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    out = DistInfo(rank=info["rank"], world_size=info["world_size"], local_rank=info["local_rank"],
                   device=dev, backend=None, launcher=info["launcher"])
    if out.world_size > 1 and not dist.is_initialized():
        os.environ["MASTER_ADDR"] = info["master_addr"]
        os.environ["MASTER_PORT"] = str(info["master_port"])
        os.environ.setdefault("RANK", str(out.rank))
        os.environ.setdefault("WORLD_SIZE", str(out.world_size))
        os.environ.setdefault("LOCAL_RANK", str(out.local_rank))
        kwargs = dict(backend=backend, init_method="env://", rank=out.rank, world_size=out.world_size,
                      timeout=datetime.timedelta(seconds=timeout_s))
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
    if dist.is_initialized():
        out.backend = dist.get_backend()
        _MONITOR["timeout_s"] = float(timeout_s)
        # monitored_barrier needs gloo: a side group when the main one is NCCL (collective: every rank makes it)
        _MONITOR["group"] = None if out.backend == "gloo" else dist.new_group(
            backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return out


def check_peers(timeout_s: float | None = None, where: str = "") -> None:
    """Every rank meets here within ``timeout_s`` (default: the process group's), or ``DeadPeerError``.

    A gloo ``monitored_barrier``: rank 0 waits for each rank in turn and names those that
    did not arrive; the other ranks learn that rank 0 did not answer. No-op with one process.
    """
    if not is_distributed():
        return
    t = float(timeout_s if timeout_s is not None else _MONITOR["timeout_s"])
    try:
        dist.monitored_barrier(group=_MONITOR["group"], timeout=datetime.timedelta(seconds=t), wait_all_ranks=True)
    except RuntimeError as e:
        text = str(e)
        m = re.search(r"[Rr]anks? ([\d, ]+?) failed to pass", text) or re.search(r"[Rr]ank (\d+)", text)
        who = f"rank(s) {m.group(1).strip()}" if m else "some rank"
        raise DeadPeerError(
            f"{who} did not answer within train.dist_timeout={t:g} s{' at ' + where if where else ''} (this is rank "
            f"{get_rank()}): the process is hung or dead (check its log: data loading stuck, out of memory, node "
            f"lost). Restart the job; resume=auto continues from the last checkpoint") from e


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over processes (a copy; identity with one process)."""
    t = t.detach().clone()
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, device: torch.device | str | None = None) -> bool:
    """True on every process if ``flag`` is true on any (a collective: every rank calls it at the same point;
    the flag itself with one process). ``device``: where the all-reduce runs (default: the current CUDA
    device under NCCL, else the CPU)."""
    if not is_distributed():
        return bool(flag)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t) > 0


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over processes (a copy; identity with one process)."""
    return all_reduce_sum(t) / get_world_size()


def all_gather_rows(rows: torch.Tensor) -> list[torch.Tensor]:
    """Every process's ``rows`` [n_r, ...] (n_r may differ): padded to the largest, gathered, unpadded.
    One process: ``[rows]``."""
    if not is_distributed():
        return [rows]
    world = get_world_size()
    count = torch.tensor([rows.shape[0]], device=rows.device, dtype=torch.long)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    padded = rows.new_zeros((max(counts),) + tuple(rows.shape[1:]))
    padded[:rows.shape[0]] = rows
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded.contiguous())
    return [o[:c] for o, c in zip(out, counts)]


def seed_everything(seed: int, rank: int | None = None) -> int:
    """Seed python, numpy and torch with ``seed + rank`` (different augmentation per rank); returns it."""
    s = int(seed) + (get_rank() if rank is None else int(rank))
    random.seed(s)
    np.random.seed(s % (2 ** 32))
    torch.manual_seed(s)
    return s


def cleanup() -> None:
    _MONITOR["group"] = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

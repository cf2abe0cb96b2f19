"""Which process computes which module, and how per-module sums are combined.

A compression sums many things over modules (per-adapter cluster costs, the
objective, subspace affinities, ...). Floating-point addition is not
associative, so a sum split across processes in any other order than the
single-process one changes the last bits, and a tie-break or a k-means step
downstream may then go another way. :class:`ModuleTeam` keeps the order fixed:

* the modules are cut into contiguous blocks, one per process, in module
  order, with about equal work (``d_in x d_out x n``) per block;
* a sum over modules is a relay: the first process adds its modules'
  contributions to zeros in module order and sends the running sum to the
  next process, which adds its own in order, and so on; the last process
  broadcasts the total. Processes without modules in the sum are skipped. Every
  addition happens in the order (and on the same operands) of a single
  process adding module after module, so the result is bitwise the same
  whatever the number of processes. Only the additions wait for each other;
  the work that produces the contributions runs in parallel.

One process (``ModuleTeam()``, no process group) is the same code with a
single block and no communication.

Errors: a process that raises while the others wait in a collective would hang
them. Every collective here is preceded by an error-flag all-reduce
(:meth:`ModuleTeam.check`): when any process failed, every process raises, the
failed one its own exception and the others :class:`RankFailed` carrying its
message.
"""

from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["ModuleTeam", "RankFailed", "SOLO"]


class RankFailed(RuntimeError):
    """Another process of the team failed; the message names it and says why."""


class ModuleTeam:
    """The processes of ``group`` (default: none, i.e. this process alone) compressing one collection."""

    def __init__(self, group=None):
        import torch.distributed as dist

        self.group = group
        self._dist = dist if group is not None else None
        self.rank = dist.get_rank(group) if group is not None else 0
        self.world = dist.get_world_size(group) if group is not None else 1
        # NCCL moves only CUDA tensors; gloo moves CPU ones.
        nccl = group is not None and dist.get_backend(group) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        #: Logical payload this process sent (bytes) and collectives it joined, for the benchmarks.
        self.bytes_sent = 0
        self.collectives = 0

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------- split
    def owners(self, specs, n: int = 1) -> list[int]:
        """Process of each module: contiguous blocks in module order, balanced by ``d_in x d_out x n``."""
        work = [float(s.d_in) * float(s.d_out) * max(int(n), 1) for s in specs]
        total = sum(work) or 1.0
        out, before = [], 0.0
        for w in work:
            # A module goes to the block its midpoint falls in: blocks stay contiguous and
            # no process gets more than one module beyond its share.
            out.append(min(self.world - 1, int(self.world * (before + w / 2) / total)))
            before += w
        return out

    def holders(self, specs, n: int = 1) -> list[int]:
        """The processes that own at least one of ``specs``, in order (the relay's stops)."""
        return sorted(set(self.owners(specs, n)))

    def local(self, specs, n: int = 1) -> list[int]:
        """Indices into ``specs`` of this process's modules, in module order."""
        return [i for i, r in enumerate(self.owners(specs, n)) if r == self.rank]

    # ------------------------------------------------------------- errors
    def check(self, error: BaseException | None = None) -> None:
        """Raise on every process when any process passes an error (a collective: all must call it)."""
        if self.world == 1:
            if error is not None:
                raise error
            return
        flag = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=self.device)
        self._dist.all_reduce(flag, op=self._dist.ReduceOp.MAX, group=self.group)
        self.collectives += 1
        if int(flag) == 0:
            return
        msgs = self.all_objects(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        first = next(r for r, m in enumerate(msgs) if m is not None)
        raise RankFailed(f"rank {first} of {self.world} failed: {msgs[first]}")

    def run(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` on this process, then :meth:`check`: every process raises if any failed."""
        if self.world == 1:
            return fn(*args, **kwargs)
        try:
            out = fn(*args, **kwargs)
        except Exception as exc:  # re-raised by check, on every process
            self.check(exc)
            raise  # unreachable: check raised
        self.check(None)
        return out

    # ------------------------------------------------------------- collectives
    def ordered_sum(self, contributions: Iterable[torch.Tensor], numel: int, holders: list[int],
                    dtype=torch.float64) -> torch.Tensor:
        """Sum over all modules of flat ``[numel]`` contributions, bitwise as one process adding them in order.

        ``contributions`` yields this process's contributions in module order
        (it may do the work lazily; an exception there fails every process);
        ``holders``: :meth:`holders` of the modules summed over; the others
        only receive the total.
        """
        first = holders[0] if holders else 0
        acc = torch.zeros(numel, dtype=dtype) if self.rank == first else None
        pending: list[torch.Tensor] = []

        def collect():
            for c in contributions:
                c = c.reshape(-1).to(dtype=dtype, device="cpu")
                if acc is not None:
                    acc.add_(c)  # the first block needs no prefix: add as it comes, hold nothing
                else:
                    pending.append(c)

        self.run(collect)
        if self.world == 1 or not holders:
            return acc if acc is not None else torch.zeros(numel, dtype=dtype)
        d = self._dist
        buf = torch.zeros(numel, dtype=dtype, device=self.device)
        if self.rank in holders:
            at = holders.index(self.rank)
            if at > 0:
                d.recv(buf, src=self._global(holders[at - 1]), group=self.group)
                acc = buf.cpu()
                for c in pending:
                    acc.add_(c)
            if at < len(holders) - 1:
                d.send(acc.to(self.device), dst=self._global(holders[at + 1]), group=self.group)
                self.bytes_sent += acc.numel() * acc.element_size()
            else:
                buf = acc.to(self.device)
                self.bytes_sent += (self.world - 1) * buf.numel() * buf.element_size()
        d.broadcast(buf, src=self._global(holders[-1]), group=self.group)
        self.collectives += 2
        return buf.cpu()

    def maximum(self, t: torch.Tensor) -> torch.Tensor:
        """Elementwise maximum over processes (exact in any order)."""
        if self.world == 1:
            return t
        buf = t.to(self.device).clone()
        self._dist.all_reduce(buf, op=self._dist.ReduceOp.MAX, group=self.group)
        self.collectives += 1
        self.bytes_sent += buf.numel() * buf.element_size()
        return buf.to(t.device)

    def all_objects(self, obj) -> list:
        """Every process's ``obj`` (picklable, small), in rank order."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        self._dist.all_gather_object(out, obj, group=self.group)
        self.collectives += 1
        return out

    def broadcast_object(self, obj, src: int = 0):
        """Process ``src``'s ``obj`` on every process."""
        if self.world == 1:
            return obj
        box = [obj]
        self._dist.broadcast_object_list(box, src=self._global(src), group=self.group)
        self.collectives += 1
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            self._dist.barrier(group=self.group)

    def _global(self, rank: int) -> int:
        return self._dist.get_global_rank(self.group, rank) if self.group is not self._dist.group.WORLD else rank


#: This process alone: the single-process compression.
SOLO = ModuleTeam()

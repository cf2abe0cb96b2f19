"""Tensor-parallel sharding of JD tables (jdlora_ops.integrations.vllm.sharding).

Two processes on gloo each hold one shard of a layer's tables and input; the
combined result must equal the unsharded update computed in float64.
Column-parallel: output rows of U split, outputs gathered. Row-parallel:
input columns of V^T and x split; partial outputs summed, or h all-reduced.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from jdlora_ops import BatchMeta
from jdlora_ops.integrations.vllm.sharding import (
    column_parallel_update,
    row_parallel_update,
    shard_expand_side,
    shard_range,
    shard_shrink_side,
)

T, D_IN, R, C, A = 13, 48, 8, 3, 5
D_OUTS = (32, 16, 16)  # fused q/k/v with GQA-like k/v widths


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D_IN, generator=g)
    Vt = [torch.randn(C, R, D_IN, generator=g) for _ in D_OUTS]
    S = [torch.randn(A, R, R, generator=g) for _ in D_OUTS]
    U = [torch.randn(C, d, R, generator=g) for d in D_OUTS]
    cluster = torch.tensor([2, 0, 1, 0, 2], dtype=torch.int32)
    mapping = torch.tensor([0, 1, -1, 4, 2, 2, 3, -1, 0, 1, 4, 3, 2], dtype=torch.int32)
    return x, Vt, S, U, cluster, mapping


def _reference(x, Vt, S, U, cluster, mapping):
    """float64 y [T, sum d_out] of the unsharded layer."""
    ys = []
    for v, s, u in zip(Vt, S, U):
        y = torch.zeros(T, u.shape[1], dtype=torch.float64)
        for t, a in enumerate(mapping.tolist()):
            if a < 0:
                continue
            c = int(cluster[a])
            y[t] = u[c].double() @ (s[a].double() @ (v[c].double() @ x[t].double()))
        ys.append(y)
    return torch.cat(ys, dim=1)


def _worker(rank: int, world: int, port: int, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, Vt, S, U, cluster, mapping = _problem()
        meta = BatchMeta.allocate(T, A, C).build(mapping, cluster)
        # column-parallel: every slice's rows split, the rank's slices back to back
        U_loc = [shard_expand_side(u, rank, world) for u in U]
        y_loc = torch.zeros(T, sum(u.shape[1] for u in U_loc))
        column_parallel_update(x, Vt, S, U_loc, meta, y_loc)
        parts = [torch.zeros_like(y_loc) for _ in range(world)]
        dist.all_gather(parts, y_loc)
        col = []
        off = 0
        for u in U_loc:  # undo the per-slice interleaving of the shards
            w = u.shape[1]
            col += [p[:, off:off + w] for p in parts]
            off += w
        y_col = torch.cat(col, dim=1)
        # row-parallel: one slice (o_proj-like), input columns split
        lo, hi = shard_range(D_IN, rank, world)
        Vt_loc = shard_shrink_side(Vt[0], rank, world)
        y_out = torch.zeros(T, D_OUTS[0])
        row_parallel_update(x[:, lo:hi].contiguous(), Vt_loc, S[0], U[0], meta, y_out, reduce="output")
        dist.all_reduce(y_out)
        y_h = torch.zeros(T, D_OUTS[0])
        row_parallel_update(x[:, lo:hi].contiguous(), Vt_loc, S[0], U[0], meta, y_h, reduce="h")
        # As numpy arrays, pickled by value: a tensor would be sent as a handle
        # into this process's shared memory, which is gone if the process exits
        # before the parent has read it (a reset connection on a busy machine).
        q.put((rank, y_col.numpy(), y_out.numpy(), y_h.numpy()))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_rank_sharding_matches_unsharded_result():
    x, Vt, S, U, cluster, mapping = _problem()
    ref = _reference(x, Vt, S, U, cluster, mapping)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    world = 2
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, q)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(world):
            rank, *ys = q.get(timeout=120)
            results[rank] = tuple(torch.from_numpy(y) for y in ys)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    scale = float(ref.abs().max())
    for rank in range(world):
        y_col, y_out, y_h = results[rank]
        assert (y_col.double() - ref).abs().max() / scale < 1e-5
        assert (y_out.double() - ref[:, : D_OUTS[0]]).abs().max() / scale < 1e-5
        assert (y_h.double() - ref[:, : D_OUTS[0]]).abs().max() / scale < 1e-5
    # base tokens (slot -1) get nothing on any path
    for rank in range(world):
        for y in results[rank]:
            assert y[mapping == -1].abs().max() == 0


@pytest.mark.parametrize("size,world", [(10, 3), (7, 2)])
def test_uneven_split_is_a_clear_error(size, world):
    with pytest.raises(ValueError, match="not divisible by the tensor-parallel size"):
        shard_range(size, 0, world)

"""Tensor-parallel sharding of a layer's JD tables (no vLLM import).

For a JD adapter the update of one slice is ``U_c Sigma_a V_c^T``, with
``U_c`` playing the role of LoRA's ``B`` (``d_out x r``) and ``V_c^T`` that of
``A`` (``r x d_in``). Tensor parallelism splits a linear layer the same way
for both:

* column-parallel layers (q/k/v, gate/up) split the output features: rank
  ``p`` keeps its rows of ``U`` (:func:`shard_expand_side`); ``V``, ``Sigma``
  and ``x`` are whole, so each rank's output rows are exact without any
  communication;
* row-parallel layers (o, down) split the input features: rank ``p`` keeps
  its columns of ``V^T`` (:func:`shard_shrink_side`) and sees only its slice of
  ``x``, so its ``h_p = V_p^T x_p`` is a partial sum. Because the update is
  linear in ``h``, two reductions are correct: sum the partial outputs
  ``U Sigma h_p`` (the all-reduce the layer already runs on its base output
  does that: :func:`row_parallel_update` with ``reduce="output"``), or
  all-reduce ``h`` (``T x r`` values per slice, far fewer than ``T x d_out``)
  and add the update once (``reduce="h"``, for layers that do not reduce
  their output).

The split is the even contiguous one vLLM's column/row-parallel layers use
(``d / world`` per rank), except for k and v when a model has fewer KV heads
than ranks: vLLM then gives each KV head to ``world / kv_heads`` ranks, so
``U`` of k and v is cut into ``kv_heads`` blocks and neighbouring ranks hold
the same block (``rank`` and ``world`` below are then the block and the
number of blocks). :func:`row_parallel_update` and
:func:`column_parallel_update` are the reference of that maths and are
checked against the unsharded result on gloo by the tests.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ...meta import BatchMeta
from ...ops import jd_core, jd_expand, jd_fused, jd_shrink

__all__ = ["shard_range", "shard_expand_side", "shard_shrink_side", "column_parallel_update", "row_parallel_update"]


def shard_range(size: int, rank: int, world: int, what: str = "dimension") -> tuple[int, int]:
    """``[start, end)`` of rank ``rank``'s contiguous share of ``size`` features."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard_range: rank must be in [0, world={world}), got {rank}")
    if size % world:
        raise ValueError(f"shard_range: the {what} ({size}) is not divisible by the tensor-parallel size {world}")
    per = size // world
    return rank * per, (rank + 1) * per


def shard_expand_side(U: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s rows of ``U`` ``[C, d_out, r]`` (column-parallel): ``[C, d_out / world, r]``."""
    lo, hi = shard_range(U.shape[1], rank, world, "output width d_out")
    return U[:, lo:hi, :].contiguous()


def shard_shrink_side(Vt: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s columns of ``V^T`` ``[C, r, d_in]`` (row-parallel): ``[C, r, d_in / world]``."""
    lo, hi = shard_range(Vt.shape[2], rank, world, "input width d_in")
    return Vt[:, :, lo:hi].contiguous()


def column_parallel_update(
    x: torch.Tensor, V: Sequence[torch.Tensor], S: Sequence[torch.Tensor], U_local: Sequence[torch.Tensor],
    meta: BatchMeta, y_local: torch.Tensor,
) -> torch.Tensor:
    """Adds this rank's output columns of every slice's update to ``y_local``.

    ``x``: the whole input ``[T, d_in]``; ``U_local``: per slice the rank's
    rows ``[C, d_out_s / world, r]``; ``y_local``: ``[T, sum_s d_out_s / world]``
    (the slices back to back, as a column-parallel layer lays out its shard).
    """
    return jd_fused(x, list(V), list(S), list(U_local), meta, y_local)


def row_parallel_update(
    x_local: torch.Tensor, Vt_local: torch.Tensor, S: torch.Tensor, U: torch.Tensor, meta: BatchMeta,
    y: torch.Tensor, *, reduce: str = "output", group=None,
) -> torch.Tensor:
    """The update of a row-parallel layer from this rank's input slice.

    ``x_local``: ``[T, d_in / world]``; ``Vt_local``: ``[C, r, d_in / world]``;
    ``S``: ``[A, r, r]`` or ``[A, r]``; ``U``: ``[C, d_out, r]`` (whole).

    * ``reduce="output"``: adds ``U Sigma h_p`` (a partial sum) to ``y``; the
      caller sums ``y`` over ranks, as a row-parallel layer does with its base
      output.
    * ``reduce="h"``: all-reduces ``h`` over ``group`` and adds the whole
      update to ``y`` on every rank (``y`` must not be summed again).
    """
    if reduce == "output":
        return jd_fused(x_local, [Vt_local], [S], [U], meta, y)
    if reduce != "h":
        raise ValueError(f"row_parallel_update: reduce must be 'output' or 'h', got {reduce!r}")
    import torch.distributed as dist

    h = jd_shrink(x_local, [Vt_local], meta)
    dist.all_reduce(h, group=group)
    g = jd_core(h, [S], meta)
    return jd_expand(g, [U], meta, y)

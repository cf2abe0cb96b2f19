"""Typed wrappers of the jdlora_ops custom ops.

Each wrapper calls ``torch.ops.jdlora_ops.<name>``; the raw ops can be called
directly too (same argument order as their schemas, outputs passed in and
written in place). Shapes below use ``T`` tokens, ``S`` slices, ``C`` cluster
slots, ``A`` adapter slots, ``r`` rank, ``d_in`` input width, ``d_out_s`` the
output width of slice ``s``.

Common rules:

* ``x``, ``y`` and every weight stack share one dtype: float32, float16 or
  bfloat16; accumulation is float32. The intermediates ``h`` and ``g`` are
  float32 ``[S, T, r]``.
* Every tensor has stride 1 in its last dimension (wrappers make read-only
  inputs contiguous when they are not; outputs must already be). Rows may be
  strided, so ``x`` and ``y`` can be column slices of larger tensors. One
  exception, on the CPU only: the expand stacks ``U`` and ``B`` may be
  column-major, i.e. ``W.transpose(1, 2)`` of a contiguous ``[C, r, d_out]``
  tensor ``W``; the CPU kernels then read them in place instead of reordering
  each cluster's rows on every call (about as costly as the arithmetic when
  few tokens share a cluster). Results are bitwise the same in both layouts.
* Quantized tables: any shrink stack (``V``, ``A``) or expand stack (``U``,
  ``B``) may be a :class:`~jdlora_ops.quant.QuantizedTable` instead of a
  tensor (int8 rows or 4-bit groups, see :mod:`jdlora_ops.quant`), with its
  scales in the model dtype; cores stay float. All slices of one argument are
  quantized or none are (their formats may differ). The result is the float32
  accumulation over the dequantised values ``float(q) * float(s)``, within the
  float tables' bound; no dequantised copy of a table is made. On the CPU
  the values of a quantized ``U``/``B`` may be column-major like float ones
  (``data.transpose(1, 2).contiguous().transpose(1, 2)``, scales as they
  are), the faster layout there for the same reason. The raw ops
  take the values in the stacks' place (int8, or uint8 holding two 4-bit
  values per byte) and the scales in the optional ``*_quant_scales`` lists.
  The scales' values are not checked on each call (that would cost a device
  synchronisation): :func:`~jdlora_ops.quant.check_quantized` checks tables
  that come from outside.
* Tokens with adapter slot ``-1`` contribute nothing to ``y``; their rows of
  ``h`` and ``g`` are set to zero.
* The CUDA kernels allocate nothing and never synchronise with the host, so
  every op can be captured in a CUDA graph.
* Bad arguments raise ``RuntimeError``/``ValueError`` naming the argument, the
  expected and the actual value, before any output is written.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

from .meta import BatchMeta
from .quant import QuantizedTable

__all__ = [
    "build_batch_meta",
    "jd_shrink",
    "jd_core",
    "jd_expand",
    "jd_fused",
    "lora_shrink",
    "lora_expand",
    "check_batch_values",
]

Stack = Union[torch.Tensor, QuantizedTable]
Stacks = Union[Stack, Sequence[Stack]]
_ops = torch.ops.jdlora_ops


def _quantized(name: str, stacks: Stacks) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """The stacks as the raw ops take them: the tensors, or the quantized tables' values and their scales."""
    raw = [stacks] if isinstance(stacks, (torch.Tensor, QuantizedTable)) else list(stacks)
    kinds = {isinstance(t, QuantizedTable) for t in raw}
    if len(kinds) > 1:
        raise ValueError(f"{name}: every slice must be quantized or none, got "
                         f"{['quantized' if isinstance(t, QuantizedTable) else 'float' for t in raw]}")
    if kinds != {True}:
        return raw, None
    return [t.data for t in raw], [_read_only(t.scales) for t in raw]


def _as_list(name: str, stacks: Stacks) -> list[torch.Tensor]:
    if isinstance(stacks, torch.Tensor):
        stacks = [stacks]
    out = list(stacks)
    if not out:
        raise ValueError(f"{name} must hold at least one tensor (one per slice), got none")
    return [t if t.dim() == 0 or t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous() for t in out]


def _expand_stacks(name: str, stacks: Stacks) -> list[torch.Tensor]:
    """Like :func:`_as_list`, but a column-major CPU stack (see the module docstring) is passed as it is."""
    raw = [stacks] if isinstance(stacks, torch.Tensor) else list(stacks)
    if not raw:
        return _as_list(name, raw)
    return [t if (t.device.type == "cpu" and t.dim() == 3 and t.shape[1] > 1 and t.shape[2] > 1
                  and t.stride(1) == 1) else _read_only(t) for t in raw]


def _read_only(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 0 or t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _offsets(U_stacks: list[torch.Tensor], slice_offsets: Sequence[int] | None) -> list[int]:
    if slice_offsets is not None:
        return [int(o) for o in slice_offsets]
    offs, acc = [], 0
    for U in U_stacks:
        offs.append(acc)
        acc += U.shape[1] if U.dim() == 3 else 0
    return offs


def _intermediate(out: torch.Tensor | None, S: int, T: int, r: int, device: torch.device) -> torch.Tensor:
    return torch.empty(S, T, r, dtype=torch.float32, device=device) if out is None else out


def check_batch_values(token_lora_mapping: torch.Tensor, adapter_cluster: torch.Tensor, num_clusters: int) -> None:
    """Check metadata values on the host (one device synchronisation on CUDA).

    Raises ``ValueError`` when a slot is outside ``[-1, len(adapter_cluster))``
    or a used slot's cluster is outside ``[0, num_clusters)``.
    """
    m = token_lora_mapping.detach().to("cpu", torch.int64)
    cm = adapter_cluster.detach().to("cpu", torch.int64)
    A = cm.numel()
    bad = ((m < -1) | (m >= A)).nonzero()
    if bad.numel():
        t = int(bad[0])
        raise ValueError(
            f"build_batch_meta: token_lora_mapping[{t}] = {int(m[t])} is out of range: expected -1 "
            f"(no adapter) or a slot in [0, {A}) (the number of adapter slots, from adapter_cluster)"
        )
    used = m[m >= 0]
    cl = cm[used]
    bad = ((cl < 0) | (cl >= num_clusters)).nonzero()
    if bad.numel():
        a = int(used[int(bad[0])])
        raise ValueError(
            f"build_batch_meta: adapter_cluster[{a}] = {int(cm[a])} is out of range: expected a cluster "
            f"id in [0, {num_clusters}) (the number of clusters)"
        )


def build_batch_meta(
    token_lora_mapping: torch.Tensor, adapter_cluster: torch.Tensor, meta: BatchMeta, *, validate: bool = False
) -> BatchMeta:
    """Sort the batch's tokens by ``(cluster, adapter)`` into ``meta``'s buffers.

    ``token_lora_mapping``: int32 ``[T]``, adapter slot per token or -1.
    ``adapter_cluster``: int32 ``[A]``, cluster slot of each adapter slot
    (``A == meta.max_adapters``; values of unused slots are ignored).
    See :class:`BatchMeta` for the outputs and ``validate``.
    """
    return meta.build(token_lora_mapping, adapter_cluster, validate=validate)


def jd_shrink(x: torch.Tensor, V_stacks: Stacks, meta: BatchMeta, out: torch.Tensor | None = None) -> torch.Tensor:
    """``h[s, t] = V_stacks[s][c(t)] @ x[t]`` with ``c(t)`` the cluster of token ``t``.

    ``x``: ``[T, d_in]``; ``V_stacks``: one ``[C, r, d_in]`` per slice;
    returns ``h`` (``out`` if given): float32 ``[S, T, r]``. Each cluster's
    ``V`` is read once per batch, for all of its tokens.
    """
    Vs, Vq = _quantized("V_stacks", V_stacks)
    Vs = _as_list("V_stacks", Vs)
    h = _intermediate(out, len(Vs), x.shape[0], Vs[0].shape[1] if Vs[0].dim() == 3 else 0, x.device)
    _ops.jd_shrink(_read_only(x), Vs, meta.sorted_indices(), meta.active_cluster_ids, meta.cluster_token_start, h,
                   Vq)
    return h


def jd_core(h: torch.Tensor, S_stacks: Stacks, meta: BatchMeta, out: torch.Tensor | None = None) -> torch.Tensor:
    """``g[s, t] = S_stacks[s][a(t)] @ h[s, t]`` with ``a(t)`` the adapter slot of token ``t``.

    ``h``: float32 ``[S, T, r]``; ``S_stacks``: one per slice, ``[A, r, r]``
    (full core) or ``[A, r]`` (diagonal core: ``g = sigma * h``), with the
    adapter's scaling folded in; returns ``g`` (``out`` if given, which may be
    ``h`` itself): float32 ``[S, T, r]``.
    """
    Ss = _as_list("S_stacks", S_stacks)
    g = torch.empty_like(h) if out is None else out
    _ops.jd_core(h, Ss, meta.mapping(), g)
    return g


def jd_expand(
    g: torch.Tensor, U_stacks: Stacks, meta: BatchMeta, y: torch.Tensor, slice_offsets: Sequence[int] | None = None
) -> torch.Tensor:
    """``y[t, o_s : o_s + d_out_s] += U_stacks[s][c(t)] @ g[s, t]``, in place; returns ``y``.

    ``g``: float32 ``[S, T, r]``; ``U_stacks``: one ``[C, d_out_s, r]`` per
    slice; ``y``: ``[T, d_y]``; ``slice_offsets`` (default: slices back to
    back from column 0) gives ``o_s``, e.g. ``[0, 4096, 5120]`` for a fused
    q/k/v output with GQA.
    """
    Us, Uq = _quantized("U_stacks", U_stacks)
    Us = _expand_stacks("U_stacks", Us)
    _ops.jd_expand(g, Us, _offsets(Us, slice_offsets), meta.sorted_indices(), meta.active_cluster_ids,
                   meta.cluster_token_start, y, Uq)
    return y


def jd_fused(
    x: torch.Tensor, V_stacks: Stacks, S_stacks: Stacks, U_stacks: Stacks, meta: BatchMeta, y: torch.Tensor,
    slice_offsets: Sequence[int] | None = None,
) -> torch.Tensor:
    """``y[t, o_s : o_s + d_out_s] += U_s[c(t)] S_s[a(t)] V_s[c(t)] x[t]`` in one call; returns ``y``.

    Same arguments as :func:`jd_shrink`, :func:`jd_core` and :func:`jd_expand`
    (one ``V``, ``S`` and ``U`` stack per slice, all with the same ``r``);
    ``h`` and ``g`` never leave the kernel.
    """
    (Vs, Vq), (Us, Uq) = _quantized("V_stacks", V_stacks), _quantized("U_stacks", U_stacks)
    Vs, Ss, Us = _as_list("V_stacks", Vs), _as_list("S_stacks", S_stacks), _expand_stacks("U_stacks", Us)
    _ops.jd_fused(_read_only(x), Vs, Ss, Us, _offsets(Us, slice_offsets), meta.mapping(), meta.sorted_indices(),
                  meta.active_cluster_ids, meta.cluster_token_start, y, Vq, Uq)
    return y


def lora_shrink(
    x: torch.Tensor, A_stacks: Stacks, scales: torch.Tensor, meta: BatchMeta, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Uncompressed baseline: ``h[s, t] = scales[s, a(t)] * A_stacks[s][a(t)] @ x[t]``.

    ``x``: ``[T, d_in]``; ``A_stacks``: one ``[A, r, d_in]`` per slice;
    ``scales``: float32 ``[S, A]`` or ``[A]`` (shared by all slices; e.g.
    ``lora_alpha / r`` per adapter); returns float32 ``h`` ``[S, T, r]``.
    Tokens are grouped by adapter (SGMV); an adapter's ``A`` is read once per
    batch.
    """
    As, Aq = _quantized("A_stacks", A_stacks)
    As = _as_list("A_stacks", As)
    if scales.dim() == 1:
        scales = scales.expand(len(As), -1)
    h = _intermediate(out, len(As), x.shape[0], As[0].shape[1] if As[0].dim() == 3 else 0, x.device)
    _ops.lora_shrink(_read_only(x), As, scales, meta.sorted_indices(), meta.active_lora_ids,
                     meta.lora_token_start_loc, h, Aq)
    return h


def lora_expand(
    h: torch.Tensor, B_stacks: Stacks, meta: BatchMeta, y: torch.Tensor, slice_offsets: Sequence[int] | None = None
) -> torch.Tensor:
    """Uncompressed baseline: ``y[t, o_s : o_s + d_out_s] += B_stacks[s][a(t)] @ h[s, t]``; returns ``y``.

    ``h``: float32 ``[S, T, r]``; ``B_stacks``: one ``[A, d_out_s, r]`` per slice.
    """
    Bs, Bq = _quantized("B_stacks", B_stacks)
    Bs = _expand_stacks("B_stacks", Bs)
    _ops.lora_expand(h, Bs, _offsets(Bs, slice_offsets), meta.sorted_indices(), meta.active_lora_ids,
                     meta.lora_token_start_loc, y, Bq)
    return y

"""Quantized adapter tables: int8 rows and 4-bit groups, the one definition every quantized path reads.

Every table the ops read has its reduction dimension last: the shared bases ``U`` and the
baseline ``B`` are ``[..., d_out, r]`` (expand sums over ``r``), ``V^T`` and ``A`` are
``[..., r, d_in]`` (shrink sums over ``d_in``). A quantized table keeps the leading dimensions and
cuts each row (length ``L``, the last dimension) into groups of ``G`` consecutive values that share
one scale, so a scale factors out of a partial dot product over its group:

``int8``
    ``G = L``: one scale per row (per output channel of ``U``/``B``, per rank row of ``V^T``/``A``).
    ``q = round(w / s)`` clamped to ``[-127, 127]``, stored as ``int8 [..., L]``.
``int4``
    ``G`` = 32, 64 or 128 (:data:`GROUP_SIZES`), capped at ``L`` (a row no longer than ``G`` is one
    group); ``G`` must divide ``L`` and ``L`` must be even. ``q = round(w / s)`` clamped to
    ``[-7, 7]``, stored as ``q + 8`` (1..15), two values per byte: byte ``j`` of a row holds value
    ``2j`` in its low nibble and value ``2j + 1`` in its high nibble; ``uint8 [..., L / 2]``.

Scales are stored in the table's float dtype (float32, float16 or bfloat16), shape
``[..., L / G]``, finite and >= 0. A group's scale is ``max |w| / qmax`` (``qmax`` 127 or 7) rounded
to that dtype; the values are rounded against the stored scale, so ``q * s`` is the nearest grid
point to ``w`` except where rounding the scale down pushed ``|w| / s`` past ``qmax`` (then clamped).
A group of zeros has scale 0.

The dequantised table, the contract the ops compute against, is exactly
``w_hat[..., i] = float(q[..., i]) * float(s[..., i // G])``: a float64 reference is
``q.double() * s.double()`` on the stored tensors (:meth:`QuantizedTable.dequantize`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._finite import NonFiniteError

__all__ = ["FORMATS", "GROUP_SIZES", "SCALE_DTYPES", "QuantizedTable", "quantize", "pack_int4", "unpack_int4",
           "check_quantized", "effective_group_size"]

#: The formats by name, and their bits per value.
FORMATS = {"int8": 8, "int4": 4}
#: The 4-bit group sizes along the reduction dimension.
GROUP_SIZES = (32, 64, 128)
#: The dtypes a table's scales (and its float tables) may have.
SCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_QMAX = {8: 127, 4: 7}


def effective_group_size(fmt: str, length: int, group_size: int | None = None) -> int:
    """The group size ``fmt`` uses on rows of ``length`` values: the whole row for int8, else ``group_size``
    (default 64) capped at the row. ``ValueError`` naming the argument for an unknown format, a 4-bit group
    size outside :data:`GROUP_SIZES`, one that does not divide the row, or an odd row length for int4."""
    if fmt not in FORMATS:
        raise ValueError(f"quantize (--quantize) must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "int8":
        if group_size is not None and group_size != length:
            raise ValueError(f"group_size (--group-size) applies to int4 only (int8 has one scale per row of "
                             f"{length}), got {group_size!r}")
        return length
    g = 64 if group_size is None else group_size
    if isinstance(g, bool) or not isinstance(g, int) or g not in GROUP_SIZES:
        raise ValueError(f"group_size (--group-size) must be one of {', '.join(map(str, GROUP_SIZES))}, got {g!r}")
    g = min(g, length)
    if length % 2:
        raise ValueError(f"int4 packs two values per byte: the reduction dimension must be even, got {length}")
    if length % g:
        raise ValueError(f"group_size (--group-size) {g} does not divide the reduction dimension {length}")
    return g


@dataclass(frozen=True)
class QuantizedTable:
    """One quantized table (see the module docstring): ``data`` int8 ``[..., L]`` or uint8 ``[..., L / 2]``,
    ``scales`` ``[..., L / G]``, ``fmt`` ``"int8"``/``"int4"``, ``group_size`` ``G``, ``length`` ``L``."""

    data: torch.Tensor
    scales: torch.Tensor
    fmt: str
    group_size: int
    length: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the float table it stands for."""
        return (*self.data.shape[:-1], self.length)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scales.numel() * self.scales.element_size()

    def take(self, index: torch.Tensor) -> "QuantizedTable":
        """The entries ``index`` of the leading dimension (clusters of a stack of bases)."""
        return QuantizedTable(self.data[index].contiguous(), self.scales[index].contiguous(), self.fmt,
                              self.group_size, self.length)

    def values(self) -> torch.Tensor:
        """The integer values ``q`` (int8 ``[..., L]``, in ``[-127, 127]`` or ``[-7, 7]``)."""
        return self.data if self.fmt == "int8" else unpack_int4(self.data)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``q * s`` per group, computed in ``dtype`` (float64 gives the exact reference)."""
        q = self.values().to(dtype)
        s = self.scales.to(dtype).repeat_interleave(self.group_size, dim=-1)
        return q * s


def quantize(w: torch.Tensor, fmt: str, group_size: int | None = None, *,
             scale_dtype: torch.dtype | None = None) -> QuantizedTable:
    """``w`` (float, reduction dimension last) in format ``fmt`` with scales in ``scale_dtype`` (default
    ``w``'s dtype; float64 too, for stores and references, though the ops take the other three). Refuses non-finite ``w`` (:class:`~jdlora_ops.NonFiniteError`) and the bad group sizes
    of :func:`effective_group_size`."""
    if not w.is_floating_point() or w.dim() < 1:
        raise ValueError(f"quantize: w must be a float tensor with a reduction dimension, got {w.dtype} of shape "
                         f"{tuple(w.shape)}")
    scale_dtype = scale_dtype or w.dtype
    if scale_dtype not in (*SCALE_DTYPES, torch.float64):  # float64: a store's or a reference's tables
        raise ValueError(f"quantize: scale_dtype must be one of float32, float16, bfloat16, float64, got "
                         f"{scale_dtype}")
    if not bool(torch.isfinite(w).all()):
        raise NonFiniteError(f"quantize: w holds NaN or infinite values (shape {tuple(w.shape)})")
    L = w.shape[-1]
    g = effective_group_size(fmt, L, group_size)
    qmax = _QMAX[FORMATS[fmt]]
    groups = w.to(torch.float32).reshape(*w.shape[:-1], L // g, g)
    scales = (groups.abs().amax(dim=-1) / qmax).to(scale_dtype)
    s = scales.to(torch.float32)[..., None]
    q = torch.where(s > 0, torch.round(groups / torch.where(s > 0, s, torch.ones_like(s))), torch.zeros_like(groups))
    q = q.clamp(-qmax, qmax).to(torch.int8).reshape(w.shape)
    data = q if fmt == "int8" else pack_int4(q)
    return QuantizedTable(data.contiguous(), scales.contiguous(), fmt, g, L)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int values in ``[-8, 7]`` (last dimension even) -> uint8 ``[..., L / 2]``: low nibble value ``2j``,
    high nibble ``2j + 1``, each stored plus 8."""
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4: the last dimension must be even, got {q.shape[-1]}")
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_int4`: int8 ``[..., 2 * packed.shape[-1]]``."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4: packed must be uint8, got {packed.dtype}")
    lo = (packed & 0xF).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def check_quantized(name: str, data: torch.Tensor, scales: torch.Tensor, fmt: str, length: int,
                    group_size: int | None = None, *, leading: tuple[int, ...] | None = None) -> QuantizedTable:
    """A quantized table that came from outside (an op's arguments, a store file), checked against the format
    before anything reads it: ``ValueError`` naming ``name`` (``{name}`` for the values, ``{name}_scales``)
    with the expected and the actual dtype or shape, :class:`~jdlora_ops.NonFiniteError` for scales that
    are not finite, ``ValueError`` for negative ones. ``leading``: the expected leading dimensions."""
    g = effective_group_size(fmt, length, group_size)
    want_dtype = torch.int8 if fmt == "int8" else torch.uint8
    if data.dtype != want_dtype:
        raise ValueError(f"{name}: {fmt} values must be {str(want_dtype).replace('torch.', '')}, got "
                         f"{str(data.dtype).replace('torch.', '')}")
    width = length if fmt == "int8" else length // 2
    lead = tuple(data.shape[:-1]) if leading is None else tuple(leading)
    if tuple(data.shape) != (*lead, width):
        raise ValueError(f"{name}: {fmt} values of rows of {length} must have shape {[*lead, width]}"
                         f"{' (two values per byte)' if fmt == 'int4' else ''}, got {list(data.shape)}")
    if scales.dtype not in SCALE_DTYPES:
        raise ValueError(f"{name}_scales: must be float32, float16 or bfloat16, got "
                         f"{str(scales.dtype).replace('torch.', '')}")
    if tuple(scales.shape) != (*lead, length // g):
        raise ValueError(f"{name}_scales: one scale per group of {g} must have shape {[*lead, length // g]}, got "
                         f"{list(scales.shape)}")
    if not bool(torch.isfinite(scales).all()):
        raise NonFiniteError(f"{name}_scales: holds NaN or infinite values")
    if bool((scales < 0).any()):
        raise ValueError(f"{name}_scales: scales must be >= 0 (the sign is in the values), got a negative one")
    return QuantizedTable(data, scales, fmt, g, length)

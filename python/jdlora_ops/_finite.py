"""The non-finite input policy: NaN and +-Inf are refused wherever adapter factors or tables come in.

One NaN in one adapter's factors does not stay in that adapter: the joint
compressor sums over every adapter of a module, so it would poison the
shared bases of a whole cluster, and a served table holding one turns the
output of every token routed through it into NaN. Such values are therefore
refused where they enter (``jdlora compress``/``add``, reading a store,
registering an uncompressed adapter, the vLLM plugin), with an error naming
the adapter, the module and the tensor, before anything is written or
changed; ``jdlora verify`` reports them.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["NonFiniteError", "all_finite", "nonfinite_problem", "require_finite"]


class NonFiniteError(ValueError):
    """Adapter factors or store tables that hold NaN or infinite values (the message says where)."""


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value of ``tensor`` is finite (integer tensors always are)."""
    if not (tensor.is_floating_point() or tensor.is_complex()) or tensor.numel() == 0:
        return True
    return bool(torch.isfinite(tensor).all())


def _who(adapter: str | Sequence[str]) -> str:
    names = [adapter] if isinstance(adapter, str) else list(adapter)
    if not names:
        return "no adapter"
    if len(names) == 1:
        return f"adapter {names[0]!r}"
    shown = ", ".join(repr(n) for n in names[:4])
    return f"adapters {shown}" + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def nonfinite_problem(tensor: torch.Tensor, *, adapter: str | Sequence[str], module: str,
                      tensor_name: str) -> str | None:
    """``None`` when ``tensor`` is all finite, else a message naming where and what the bad values are.

    ``adapter``: the adapter's name, or the names of the adapters that share
    the tensor (a cluster's bases). The counts and the first bad index are
    only computed for a tensor that fails, so a good tensor costs one pass.
    """
    if all_finite(tensor):
        return None
    t = tensor.detach()
    bad = ~torch.isfinite(t)
    count = int(bad.sum())
    nan = int(torch.isnan(t).sum())
    pos = int((t == float("inf")).sum())
    first = [int(i) for i in bad.nonzero()[0].tolist()]
    value = float(t[tuple(first)])
    return (f"{_who(adapter)}, module {module}, tensor {tensor_name}: expected finite values, found "
            f"{count} NaN or infinite of {t.numel()} ({nan} NaN, {pos} +inf, {count - nan - pos} -inf), "
            f"first at index {first} ({value})")


def require_finite(tensor: torch.Tensor, *, adapter: str | Sequence[str], module: str,
                   tensor_name: str, source: str | None = None,
                   error: type[Exception] = NonFiniteError) -> None:
    """Raise ``error`` (default :class:`NonFiniteError`) when ``tensor`` holds NaN or an infinity.

    The message starts with ``source`` (the file or directory read, when
    there is one) and names the adapter, the module and the tensor, with the
    number of bad values and the first one's index (:func:`nonfinite_problem`).
    """
    problem = nonfinite_problem(tensor, adapter=adapter, module=module, tensor_name=tensor_name)
    if problem is not None:
        raise error(f"{source}: {problem}" if source else problem)

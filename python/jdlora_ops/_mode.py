"""Batch-invariant mode: one token's output bitwise independent of the batch.

The launchers normally choose how to split each token's sums (on CUDA, the
split of ``d_in`` over a thread-block cluster) from the number of tokens and
the GPU's multiprocessor count, so a token's output can differ in its last
bits between batches. In batch-invariant mode they fix that split from the
weights' shapes alone, so the same token gives the same bits whatever else is
in the batch, on any batch size and any supported GPU (sm_80 and sm_90). The
CPU kernels never split a token's sums and are batch-invariant in both modes.

The mode is one process-wide setting held by the native extension and read
by every launch, not an op argument: the op schemas stay the same,
``torch.compile`` traces the ops as before (the compiled code calls them, and
they read the setting when they run), and a captured CUDA graph keeps the
kernels of the mode that was on when it was captured (switch it before
capturing). Change it outside compiled regions. Its initial value is
``JDLORA_BATCH_INVARIANT=1`` (or any value other than empty or ``0``) in the
environment when ``jdlora_ops`` is imported.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from ._loader import load_extension

__all__ = ["batch_invariant", "batch_invariant_mode", "set_batch_invariant"]

_C = load_extension()
# Reads JDLORA_BATCH_INVARIANT now, on import, rather than at the first launch.
_C.batch_invariant()


def set_batch_invariant(on: bool) -> None:
    """Switch batch-invariant mode on or off for the whole process."""
    if not isinstance(on, bool):
        raise TypeError(f"set_batch_invariant: on must be a bool, got {type(on).__name__}")
    _C.set_batch_invariant(on)


def batch_invariant() -> bool:
    """Whether batch-invariant mode is on."""
    return bool(_C.batch_invariant())


@contextlib.contextmanager
def batch_invariant_mode(on: bool = True) -> Iterator[None]:
    """Batch-invariant mode on (or off) inside the ``with`` block, restored after."""
    before = batch_invariant()
    set_batch_invariant(on)
    try:
        yield
    finally:
        set_batch_invariant(before)

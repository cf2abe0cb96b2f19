"""jdlora_ops: serve thousands of jointly compressed LoRA adapters of one base model.

Importing the package loads the native extension (``jdlora_ops._C``), which
registers the custom ops under ``torch.ops.jdlora_ops``; see
:mod:`jdlora_ops.ops` for their semantics and :mod:`jdlora_ops.reference` for
float64 oracles.
"""

from ._loader import load_extension

_C = load_extension()

from . import _fake  # noqa: E402,F401  (registers the fake kernels)
from . import reference  # noqa: E402,F401
from ._finite import NonFiniteError  # noqa: E402
from ._mode import batch_invariant, batch_invariant_mode, set_batch_invariant  # noqa: E402
from .meta import BatchMeta  # noqa: E402
from .ops import (  # noqa: E402
    build_batch_meta,
    jd_core,
    jd_expand,
    jd_fused,
    jd_shrink,
    lora_expand,
    lora_shrink,
)

__version__ = _C.build_info()["version"]


def build_info() -> dict:
    """How the native extension was built: version, torch and CUDA versions,
    CUDA architectures, CUTLASS version, compiler."""
    return dict(_C.build_info())


__all__ = [
    "BatchMeta",
    "NonFiniteError",
    "batch_invariant",
    "batch_invariant_mode",
    "build_batch_meta",
    "build_info",
    "jd_core",
    "jd_expand",
    "jd_fused",
    "jd_shrink",
    "lora_expand",
    "lora_shrink",
    "reference",
    "set_batch_invariant",
]

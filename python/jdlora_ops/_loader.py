"""Loads the native extension with a message that says what to do when it fails."""

from __future__ import annotations

import importlib

import torch


def load_extension():
    try:
        ext = importlib.import_module("jdlora_ops._C")
    except ImportError as e:
        msg = str(e)
        if "undefined symbol" in msg or "cannot open shared object" in msg:
            hint = (
                f"it was probably built against another torch than the one installed "
                f"({torch.__version__}); rebuild with `pip install --no-build-isolation -e .`"
            )
        else:
            hint = "build it with `pip install --no-build-isolation -e .` from the source tree"
        raise ImportError(f"jdlora_ops: the native extension jdlora_ops._C failed to load ({msg}); {hint}") from e
    info = ext.build_info()
    built, running = info["torch_version"], torch.__version__
    if built.split("+")[0] != running.split("+")[0]:
        raise ImportError(
            f"jdlora_ops: the native extension was built for torch {built} but torch {running} is "
            f"installed; rebuild with `pip install --no-build-isolation -e .`"
        )
    return ext

"""Small file helpers shared by the store, the adapter reader/writer and the calibration stats."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile


def read_json_object(path: str | os.PathLike, error: type[Exception], what: str) -> dict:
    """The JSON object in ``path``; raises ``error`` naming the file and what it should be.

    ``what`` completes "not readable as JSON for ..." (e.g. ``"an adapter config"``).
    Only JSON is parsed: nothing here can run code.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
    except (OSError, ValueError) as exc:
        raise error(f"{os.fspath(path)}: not readable as JSON for {what} ({exc})") from exc
    if not isinstance(obj, dict):
        raise error(f"{os.fspath(path)}: {what} must be a JSON object, got {type(obj).__name__}")
    return obj


def write_json(path: str | os.PathLike, obj, **dump_args) -> None:
    """Write ``obj`` as JSON and fsync it (the caller renames it into place)."""
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, **dump_args)
        fh.flush()
        os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike):
    """Yield a temporary sibling of ``out_dir`` to fill; on success it replaces ``out_dir`` by renames.

    A reader sees the old directory or the new one, never a half-written one;
    on an exception the temporary directory is removed and ``out_dir`` is left
    as it was.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rmdir(old)
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

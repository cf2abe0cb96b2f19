"""Reading the JSON documents the library trusts (adapter configs, store and stats manifests)."""

from __future__ import annotations

import json
import os


def read_json_object(path: str | os.PathLike, error: type[Exception], what: str) -> dict:
    """The JSON object in ``path``; raises ``error`` naming the file and what it should be.

    ``what`` completes "not valid JSON for ..." (e.g. ``"an adapter config"``).
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

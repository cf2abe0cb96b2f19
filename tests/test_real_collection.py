"""The committed real adapter collection (bench/real_collection): readable, sane, compressible.

Needs neither the MiniLM model package nor training: it reads the committed
PEFT adapters and heads and compresses them once with a small setting.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from jdlora_ops.compress import compress
from jdlora_ops.peft_io import PeftCollection, find_adapter_dirs, read_peft_adapter

ROOT = os.path.join(os.path.dirname(__file__), "..", "bench", "real_collection")
ADAPTERS = os.path.join(ROOT, "adapters")
HIDDEN, LAYERS, RANK = 384, 6, 8


@pytest.fixture(scope="module")
def paths():
    found, _ = find_adapter_dirs([ADAPTERS])
    return found


def test_collection_manifest_matches_adapters(paths):
    with open(os.path.join(ROOT, "collection.json"), encoding="utf-8") as fh:
        manifest = json.load(fh)
    names = sorted(t["name"] for t in manifest["tasks"])
    assert names == sorted(os.path.basename(p) for p in paths)
    assert len(names) >= 24
    gains = [t["lora_acc"] - t["base_acc"] for t in manifest["tasks"]]
    assert sum(gains) / len(gains) > 0.02  # the adapters do something measurable on average


def test_every_adapter_reads_with_expected_shapes(paths):
    assert len(paths) >= 24
    for p in paths:
        ad = read_peft_adapter(p)
        assert ad.base_model == "sentence-transformers/all-MiniLM-L6-v2"
        assert len(ad.modules) == 3 * LAYERS
        for mod in ad.modules:
            assert mod.rsplit(".", 1)[-1] in ("query", "key", "value")
            A, B, scale = ad.load(mod)
            assert A.shape == (RANK, HIDDEN) and B.shape == (HIDDEN, RANK)
            assert A.dtype == B.dtype == torch.float16
            assert torch.isfinite(A).all() and torch.isfinite(B).all()
            assert B.abs().max() > 0 and scale == 2.0  # trained (PEFT initialises B to zero); alpha 16 / r 8
        head = load_file(os.path.join(p, "head.safetensors"))
        with open(os.path.join(p, "task.json"), encoding="utf-8") as fh:
            task = json.load(fh)
        assert head["weight"].shape == (len(task["labels"]), HIDDEN)
        assert head["bias"].shape == (len(task["labels"]),)
        assert torch.isfinite(head["weight"]).all()
        assert len(task["eval_texts"]) == len(task["eval_labels"]) > 0


def test_collection_compresses(paths, one_thread):
    result = compress(PeftCollection(paths), 8, method="full", num_clusters=2, max_iter=20, seed=0)
    s = result.summary()
    assert math.isfinite(s["mean_rel_error"]) and math.isfinite(s["max_rel_error"])
    assert 0 < s["mean_rel_error"] <= s["max_rel_error"] < 1


def test_large_collection_manifest_is_the_generator_s_task_list():
    """collection_large.json (the 220 adapters built outside the repository) names exactly the tasks the
    generator draws, with the hash-decided held-out split, and a SHA-256 for every file it built."""
    import sys

    sys.path.insert(0, ROOT)
    import make_collection

    with open(os.path.join(ROOT, "collection_large.json"), encoding="utf-8") as fh:
        manifest = json.load(fh)
    settings = manifest["settings"]
    tasks = make_collection.make_tasks_large(make_collection.load_text(), settings["count"], settings["min_train"],
                                             settings["seed"])
    assert [t["name"] for t in manifest["tasks"]] == [t["name"] for t in tasks]
    assert len(tasks) >= 200
    for row in manifest["tasks"]:
        assert row["split"] == ("heldout" if make_collection.heldout(row["name"], settings["heldout"]) else "tune")
        assert set(row["sha256"]) == set(make_collection.HASHED)
        assert all(len(d) == 64 for d in row["sha256"].values())
    held = sum(r["split"] == "heldout" for r in manifest["tasks"])
    assert 0.1 * len(tasks) < held < 0.4 * len(tasks)
    gains = [r["lora_acc"] - r["base_acc"] for r in manifest["tasks"]]
    assert sum(gains) / len(gains) > 0.02

"""Following a served store's generations, without vLLM: the front end's view of which adapters a request may
name, and the worker's tables as ``jdlora add`` / ``jdlora remove`` change the store (the engine itself is
tested in tests_vllm/test_vllm_live.py)."""

from __future__ import annotations

import logging
import os
import re
import sys
from types import SimpleNamespace

import pytest
import torch

from jdlora_ops.cli import main as cli
from jdlora_ops.integrations.vllm import live
from jdlora_ops.integrations.vllm.tables import LayerTables
from jdlora_ops.store import StoreReader, read_manifest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests_vllm"))
import fixtures  # noqa: E402

Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_live")
    model = fixtures.config_only_model(root / "model", hidden=32, intermediate=48)
    ads = fixtures.make_adapters(str(model), str(root / "adapters"), n=8, clusters=2, rank=3)
    # other weights under the names adapter_0..: for "removed and added again"
    again = fixtures.make_adapters(str(model), str(root / "again"), n=2, clusters=1, rank=3, seed=7)
    return {"root": root, "model": model, "adapters": ads, "again": again}


def _store(world, tmp_path, *args, first=4):
    path = str(tmp_path / "store")
    assert cli(["compress", *world["adapters"][:first], "--rank", "3", *args, "--out", path, "-q"]) == 0
    return path


class Worker:
    """The worker side of one layer (q and v slices of a fused layer), as the plugin wires it."""

    def __init__(self, path):
        self.first = live.open_generation(path)
        reader = self.first.reader
        index = {s.name: j for j, s in enumerate(reader.modules)}
        geometry = {"output_slices": (32, 16), "input_size": 32, "tp_rank": 0, "tp_size": 1,
                    "output_shards": ((0, 1), (0, 1)), "dtype": torch.float32, "device": torch.device("cpu")}
        self.tables = LayerTables("qv", "column", [Q, V], reader, index, geometry, 4)
        self.models: list = []  # what vLLM holds: each pins its cluster slot
        self.gens = live.WorkerGenerations(path, self.first, lambda: [self.tables], lambda: self.models)

    def check_tables(self):
        """Every store cluster of the newest generation sits in its table slot, bit for bit."""
        gen = self.gens.current
        reader = StoreReader(self.gens.path)
        assert reader.generation == gen.number
        for k, j in enumerate(gen.table_slot):
            bases = dict(zip([s.name for s in reader.modules], reader.read_bases(k)))
            for s, m in enumerate((Q, V)):
                assert torch.equal(self.tables.U[s][j], bases[m][0].float()), (k, j, m)
                assert torch.equal(self.tables.Vt[s][j], bases[m][1].float()), (k, j, m)


def _names(path):
    return [a["name"] for a in read_manifest(path)["adapters"]]


def test_add_keeps_bases_and_remove_renumbers_without_moving_them(world, tmp_path):
    path = _store(world, tmp_path, "--clusters", "2")
    w = Worker(path)
    assert w.gens.capacity == 2 and w.first.table_slot == [0, 1]
    w.gens.poll()
    assert w.gens.current is w.first  # nothing changed: one stat
    assert cli(["add", path, *world["adapters"][4:6], "-q"]) == 0
    w.gens.poll()
    g2 = w.gens.current
    assert g2.number == 2 and g2.table_slot == [0, 1] and w.gens.capacity == 2
    assert w.gens.find("adapter_5")[0] is g2
    # remove every adapter of the store's cluster 0: cluster 1 becomes cluster 0, its bases stay in slot 1
    assignment = read_manifest(path)["adapters"]
    gone = [a["name"] for a in assignment if a["cluster"] == 0]
    assert cli(["remove", path, *gone]) == 0
    w.gens.poll()
    g3 = w.gens.current
    assert g3.number == 3 and g3.table_slot == [1] and w.gens.capacity == 2
    w.check_tables()
    # a removed name: refused outside a step, found in a kept generation within one (admitted before removal)
    assert w.gens.find(gone[0]) is None
    assert "was removed from the store (generation 3)" in w.gens.absent(gone[0])
    with live.engine_step():
        assert w.gens.find(gone[0])[0] is g2
    assert "holds no adapter named 'nope'" in w.gens.absent("nope")


def test_loading_an_adapter_between_steps_and_within_one(world, tmp_path, caplog):
    """Between steps (/v1/load_lora_adapter, the resolver) the newest generation decides; within a step the
    request was admitted earlier, so a generation replaced since serves it, and one found nowhere gets zero cores
    rather than an exception that would stop the engine."""
    path = _store(world, tmp_path, "--clusters", "2")
    w = Worker(path)
    assert cli(["add", path, world["adapters"][4], "-q"]) == 0
    cores, slot = w.gens.load("adapter_4")  # polls first: added a moment ago
    g2 = w.gens.current
    i = g2.index["adapter_4"]
    assert slot == g2.table_slot[int(g2.reader.assignment[i])]
    assert all(torch.equal(cores[s.name], c) for s, c in zip(g2.reader.modules, g2.reader.read_cores(i)))
    assert cli(["add", path, world["adapters"][5], "-q"]) == 0
    assert cli(["remove", path, "adapter_5", "adapter_0"]) == 0
    with pytest.raises(LookupError, match="adapter 'adapter_0' was removed from the store"):
        w.gens.load("adapter_0")
    with live.engine_step():
        cores, _ = w.gens.load("adapter_0")
        first = w.first.reader
        want = dict(zip([m.name for m in first.modules], first.read_cores(w.first.index["adapter_0"])))
        assert all(torch.equal(cores[m], want[m]) for m in want)
        with caplog.at_level(logging.ERROR, logger="vllm.jdlora_ops"):
            cores, _ = w.gens.load("adapter_5")  # in generation 3 only, which this worker never opened
    assert "store adapter 'adapter_5' of an admitted request cannot be loaded" in caplog.text
    assert all(float(c.abs().max()) == 0 for c in cores.values())


def test_new_clusters_load_into_free_slots_or_added_ones(world, tmp_path, monkeypatch):
    """svd stores give every adapter its own cluster, so adds bring new bases; slots of removed clusters are
    reused once nothing pins them."""
    path = _store(world, tmp_path, "--method", "svd")
    w = Worker(path)
    assert w.gens.capacity == 4
    before = [t.clone() for t in w.tables.U]
    assert cli(["add", path, *world["adapters"][4:6], "-q"]) == 0
    w.gens.poll()
    assert w.gens.capacity == 6 and w.gens.current.table_slot == [0, 1, 2, 3, 4, 5]
    assert all(torch.equal(a[:4], b) for a, b in zip(w.tables.U, before))  # the other clusters untouched
    assert all(u.stride(1) == 1 for u in w.tables.U)  # grown tables keep the CPU layout
    w.check_tables()
    monkeypatch.setattr(live.WorkerGenerations, "KEEP", 0)
    w.models = [SimpleNamespace(jdlora_cluster=0)]  # vLLM still holds adapter_0
    assert cli(["remove", path, "adapter_0", "adapter_1", "adapter_2"]) == 0
    w.gens.poll()
    assert w.gens.current.table_slot == [3, 4, 5]
    assert cli(["add", path, *world["adapters"][6:8], "-q"]) == 0
    w.gens.poll()
    # slots 1 and 2 were free; slot 0 is pinned by the adapter vLLM holds
    assert w.gens.capacity == 6 and w.gens.current.table_slot == [3, 4, 5, 1, 2]
    w.check_tables()


def test_generation_failing_its_checks_leaves_the_previous_one_served(world, tmp_path, caplog):
    path = _store(world, tmp_path, "--clusters", "2")
    w = Worker(path)
    view = live.StoreView(path)
    assert view.problem("adapter_0") is None
    assert cli(["add", path, world["adapters"][4], "-q"]) == 0
    cores = os.path.join(path, read_manifest(path)["files"]["cores"])
    blob = bytearray(open(cores, "rb").read())
    blob[-1] ^= 0xFF
    with open(cores, "wb") as fh:
        fh.write(blob)
    with caplog.at_level(logging.WARNING, logger="vllm.jdlora_ops"):
        w.gens.poll()
        w.gens.poll()  # logged once per generation
        problem = view.problem("adapter_4")
    assert w.gens.current is w.first
    refusals = [r.getMessage() for r in caplog.records if "cannot be served" in r.getMessage()]
    assert len(refusals) == 2 and all("checksum mismatch" in m and "generation 1 stays served" in m for m in refusals)
    assert "the store holds no adapter named 'adapter_4'" in problem
    assert "newest generation cannot be served" in problem and "checksum mismatch" in problem
    assert view.problem("adapter_0") is None  # still served
    # repaired, then a later update: served again
    blob[-1] ^= 0xFF
    with open(cores, "wb") as fh:
        fh.write(blob)
    assert cli(["add", path, world["adapters"][5], "-q"]) == 0
    w.gens.poll()
    assert w.gens.current.number == 3 and view.problem("adapter_4") is None
    w.check_tables()


def test_store_rewritten_for_other_tables_is_refused(world, tmp_path, caplog):
    path = _store(world, tmp_path, "--clusters", "2")
    w = Worker(path)
    assert cli(["compress", *world["adapters"][:4], "--rank", "2", "--out", path, "--overwrite", "-q"]) == 0
    with caplog.at_level(logging.WARNING, logger="vllm.jdlora_ops"):
        w.gens.poll()
    assert w.gens.current is w.first
    assert "its rank is 2, the served tables have rank 3; restart the server to serve it" in caplog.text
    fixtures.config_only_model(tmp_path / "wide", hidden=48, intermediate=48)
    ads = fixtures.make_adapters(str(tmp_path / "wide"), str(tmp_path / "wide_adapters"), n=2, clusters=1, rank=3)
    assert cli(["compress", *ads, "--rank", "3", "--out", path, "--overwrite", "-q"]) == 0
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vllm.jdlora_ops"):
        w.gens.poll()
    assert w.gens.current is w.first
    assert re.search(r"generation 3: module model\.layers\.0\.\S+ is 48 x \d+, served as 32 x \d+; restart", caplog.text)


def test_front_end_view_removed_and_replaced_names(world, tmp_path):
    path = _store(world, tmp_path, "--clusters", "2")
    view = live.StoreView(path)
    assert view.problem("adapter_0") is None
    assert "holds no adapter named 'adapter_4'" in view.problem("adapter_4")
    assert cli(["add", path, world["adapters"][4], "-q"]) == 0
    assert view.problem("adapter_4") is None
    assert cli(["remove", path, "adapter_0", "adapter_1"]) == 0
    assert "adapter 'adapter_0' was removed from the store (generation 3)" in view.problem("adapter_0")
    # other weights under a name this process served: refused; under one it never served: accepted
    assert cli(["add", path, *world["again"], "-q"]) == 0
    assert "adapter 'adapter_0' was replaced in the store" in view.problem("adapter_0")
    assert view.problem("adapter_1") is None
    assert view.current.number == 4 and set(_names(path)) == set(view.current.index)


def test_lora_ids_depend_on_the_name_alone():
    ids = {live.lora_id(f"adapter_{i}") for i in range(2000)}
    assert len(ids) == 2000 and all(live.ID_BASE <= i < 2**53 for i in ids)
    assert live.lora_id("adapter_3") == live.lora_id("adapter_3")

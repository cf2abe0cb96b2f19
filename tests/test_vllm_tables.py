"""The vLLM plugin's vLLM-free parts: per-layer JD tables from a store, TP shards,
slot handling and request checks (the engine itself is tested in tests_vllm/)."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest
import torch

from jdlora_ops import BatchMeta, jd_fused
from jdlora_ops.cli import main as cli
from jdlora_ops.integrations.vllm import state as st
from jdlora_ops.integrations.vllm.tables import LayerTables, StoreMismatchError
from jdlora_ops.store import StoreReader

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests_vllm"))
import fixtures  # noqa: E402

SLOTS = 5


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_tables")
    model = fixtures.config_only_model(root / "model", hidden=32, intermediate=48)
    ads = fixtures.make_adapters(str(model), str(root / "adapters"), n=4, clusters=2, rank=3)
    out = str(root / "store")
    assert cli(["compress", *ads, "--rank", "3", "--clusters", "4", "--out", out, "-q"]) == 0
    return StoreReader(out)


def _geometry(widths, d_in, tp_rank=0, tp=1, shards=None):
    """``shards``: per slice ``(block, blocks)`` as vLLM cuts it; default block ``tp_rank`` of ``tp``."""
    return {"output_slices": tuple(widths), "input_size": d_in, "tp_rank": tp_rank, "tp_size": tp,
            "output_shards": tuple(shards) if shards is not None else ((tp_rank, tp),) * len(widths),
            "dtype": torch.float32, "device": torch.device("cpu")}


def _index(reader):
    return {s.name: j for j, s in enumerate(reader.modules)}


QKV = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]


def _dense_update(reader, module, i, x):
    """float64 reference: the store's reconstruction of adapter i's update, applied to x."""
    j = _index(reader)[module]
    U, Vt = reader.read_module_bases(j)
    k = int(reader.assignment[i])
    core = reader.read_cores(i)[j]
    core = core if core.dim() == 2 else torch.diag(core)
    return x.double() @ (U[k].double() @ core.double() @ Vt[k].double()).T


def test_qkv_layer_tables_serve_the_store_reconstruction(store):
    t = LayerTables("model.layers.0.self_attn.qkv_proj", "column", QKV, store, _index(store),
                    _geometry([32, 16, 16], 32), SLOTS)
    assert [tuple(v.shape) for v in t.Vt] == [(4, 3, 32)] * 3
    assert [tuple(u.shape) for u in t.U] == [(4, 32, 3), (4, 16, 3), (4, 16, 3)]
    assert all(u.stride(1) == 1 for u in t.U)  # column-major on the CPU: what its expand kernels read fastest
    assert all(float(s.abs().max()) == 0 for s in t.S)  # empty slots add nothing
    cores = {spec.name: c for spec, c in zip(store.modules, store.read_cores(2))}
    t.set_slot(3, cores)
    cluster = torch.zeros(SLOTS, dtype=torch.int32)
    cluster[3] = int(store.assignment[2])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 32, generator=g)
    mapping = torch.tensor([3, -1, 3, 0, 3, -1], dtype=torch.int32)
    meta = BatchMeta.allocate(6, SLOTS, 4).build(mapping, cluster)
    y = torch.zeros(6, 64)
    jd_fused(x, t.Vt, t.S, t.U, meta, y, t.offsets)
    want = torch.cat([_dense_update(store, m, 2, x) for m in QKV], dim=1)
    rows = mapping == 3
    scale = float(want.abs().max())
    assert float((y[rows].double() - want[rows]).abs().max()) < 2e-5 * scale
    assert float(y[~rows].abs().max()) == 0  # slot 0 is empty, slot -1 is the base model
    t.clear_slot(3)
    assert all(float(s.abs().max()) == 0 for s in t.S)


def test_tensor_parallel_shards(store):
    U_full, Vt_full = store.read_module_bases(_index(store)[QKV[0]])
    col = LayerTables("x.qkv_proj", "column", QKV, store, _index(store), _geometry([16, 8, 8], 32, 1, 2), SLOTS)
    torch.testing.assert_close(col.U[0], U_full[:, 16:, :].float())
    torch.testing.assert_close(col.Vt[0], Vt_full.float())
    o = "model.layers.0.self_attn.o_proj"
    U_o, Vt_o = store.read_module_bases(_index(store)[o])
    row = LayerTables("x.o_proj", "row", [o], store, _index(store), _geometry([32], 16, 1, 2), SLOTS)
    torch.testing.assert_close(row.Vt[0], Vt_o[:, :, 16:].float())
    torch.testing.assert_close(row.U[0], U_o.float())


def test_replicated_kv_heads_share_their_block(store):
    """Two ranks, one KV head (the fixture's 2 heads / 1 KV head): q is split, k and v are whole on both ranks,
    as vLLM replicates the KV head; with 2 KV heads over 4 ranks, ranks 2 and 3 share the second block."""
    U = {m: store.read_module_bases(_index(store)[m])[0].float() for m in QKV}
    for rank in (0, 1):
        t = LayerTables("x.qkv_proj", "column", QKV, store, _index(store),
                        _geometry([16, 16, 16], 32, rank, 2, [(rank, 2), (0, 1), (0, 1)]), SLOTS)
        torch.testing.assert_close(t.U[0], U[QKV[0]][:, 16 * rank:16 * (rank + 1)])
        torch.testing.assert_close(t.U[1], U[QKV[1]])
        torch.testing.assert_close(t.U[2], U[QKV[2]])
    for rank in (2, 3):
        t = LayerTables("x.qkv_proj", "column", QKV, store, _index(store),
                        _geometry([8, 8, 8], 32, rank, 4, [(rank, 4), (1, 2), (1, 2)]), SLOTS)
        torch.testing.assert_close(t.U[0], U[QKV[0]][:, 8 * rank:8 * (rank + 1)])
        torch.testing.assert_close(t.U[1], U[QKV[1]][:, 8:])
    # the k block must still cover the store's projection: 16 rows as 2 blocks of 16 is another model
    with pytest.raises(StoreMismatchError, match=r"k_proj is 16 x 32 in the store but 32 x 32 in the model"):
        LayerTables("x.qkv_proj", "column", QKV, store, _index(store), _geometry([16, 16, 16], 32, 1, 2), SLOTS)


def test_fused_single_slice_is_refused_under_tensor_parallelism(store):
    why = "QKVParallelLinearWithLoRA serves the fused projection QKVParallelLinear as one LoRA slice"
    with pytest.raises(StoreMismatchError, match=f"layer x.qkv_proj at tensor-parallel size 2: {why}"):
        LayerTables("x.qkv_proj", "column", [QKV[0]], store, _index(store),
                    dict(_geometry([16], 32, 1, 2), output_shards=why), SLOTS)


def test_uncovered_slice_is_zero_and_shape_mismatch_is_an_error(store):
    t = LayerTables("x.qkv_proj", "column", [QKV[0], None, QKV[2]], store, _index(store),
                    _geometry([32, 16, 16], 32), SLOTS)
    assert t.covered == [True, False, True] and float(t.U[1].abs().max()) == 0
    with pytest.raises(StoreMismatchError, match=r"is 32 x 32 in the store but 64 x 32 in the model vLLM loaded"):
        LayerTables("x.q", "column", [QKV[0]], store, _index(store), _geometry([64], 32), SLOTS)


def test_packed_layer_names_map_to_store_modules():
    assert st._slice_modules("model.layers.3.self_attn.qkv_proj", 3, {}) == [
        "model.layers.3.self_attn.q_proj", "model.layers.3.self_attn.k_proj", "model.layers.3.self_attn.v_proj"]
    assert st._slice_modules("model.layers.0.mlp.gate_up_proj", 2, {"gate_up_proj": ["gate_proj", "up_proj"]}) == [
        "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    assert st._slice_modules("model.layers.0.mlp.down_proj", 1, {}) == ["model.layers.0.mlp.down_proj"]
    with pytest.raises(StoreMismatchError, match="cannot tell the 4 projections"):
        st._slice_modules("model.layers.0.self_attn.qkv_proj", 4, {})


def test_store_request_checks(store, tmp_path):
    from jdlora_ops.integrations.vllm.live import StoreView

    def req(name, path):
        return SimpleNamespace(lora_name=name, lora_path=path)

    view = StoreView(store.path)
    ok = req("adapter_1", store.path)
    assert st.store_request_problem(ok, store.path, view.problem) is None
    assert st.store_request_problem(req("adapter_1", str(tmp_path)), store.path, view.problem) is None
    assert "holds no adapter named 'nope'" in st.store_request_problem(req("nope", store.path), store.path,
                                                                        view.problem)
    assert "started without one" in st.store_request_problem(ok, None, view.problem)
    assert "serves the jdlora store /elsewhere" in st.store_request_problem(ok, "/elsewhere", view.problem)

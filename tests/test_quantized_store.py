"""Stores with quantized bases: ``jdlora compress --quantize``, reading them back, inspect, add, export, remove."""

from __future__ import annotations

import json
import os

import pytest
import torch

from jdlora_ops.cli import main
from jdlora_ops.compress.quantized_bases import quantize_bases
from jdlora_ops.peft_io import PeftCollection
from jdlora_ops.store import (FORMAT_VERSION, NonFiniteStoreError, StoreError, StoreReader, file_sha256,
                              load_store, read_manifest, save_store)

pytest.importorskip("peft")
pytest.importorskip("transformers")

from test_peft_io import make_adapter, peft_deltas  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("qadapters")
    return [make_adapter(root / f"task{i}", seed=i, r=[4, 8, 4, 6, 4][i], lora_alpha=8) for i in range(5)]


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("fmt,group", [("int8", None), ("int4", 32)])
def test_compress_quantized_then_read_inspect_add_export(tmp_path, capsys, adapters, fmt, group):
    store = tmp_path / "store"
    extra = ["--group-size", group] if group else []
    rc, out, err = run(capsys, "compress", *adapters[:4], "--rank", 8, "--clusters", 2, "--out", store, "--quiet",
                       "--store-dtype", "bfloat16", "--quantize", fmt, *extra)
    assert rc == 0, err
    assert f"bases quantized: {fmt}" in out
    m = read_manifest(store)
    assert m["format_version"] == FORMAT_VERSION == 4
    assert m["quantization"] == {"format": fmt, "group_size": group, "tables": ["U", "Vt"]}

    # The bases file holds the values and their scales, nothing else; the reader gives both forms.
    reader = StoreReader(store)
    assert reader.quantization == m["quantization"]
    want_dtype = torch.int8 if fmt == "int8" else torch.uint8
    float_bases = 0
    for j, spec in enumerate(reader.modules):
        Uq, Vq = reader.read_module_bases_quantized(j)
        assert Uq.data.dtype == want_dtype and Vq.data.dtype == want_dtype
        assert Uq.scales.dtype == torch.bfloat16
        assert Uq.shape == (2, spec.d_out, 8) and Vq.shape == (2, 8, spec.d_in)
        U, Vt = reader.read_module_bases(j)
        assert torch.equal(U, Uq.dequantize(torch.float32).to(torch.bfloat16))
        assert torch.equal(reader.read_bases(1)[j][1], Vt[1])
        float_bases += 2 * (U.numel() + Vt.numel())
    assert reader.table_bytes("bases") < (0.6 if fmt == "int8" else 0.35) * float_bases

    # load_store: the float paths read the dequantised bases, the stored form rides along.
    back = load_store(store)
    for cm in back.modules.values():
        Uq, Vq = cm.quantized
        assert torch.equal(cm.U, Uq.dequantize(torch.float32).to(torch.bfloat16))
        assert torch.equal(cm.Vt, Vq.dequantize(torch.float32).to(torch.bfloat16))

    rc, out, err = run(capsys, "inspect", store)
    assert rc == 0, err
    assert f"bases      quantized {fmt}" in out and "errors include the quantization" in out
    rc, out, _ = run(capsys, "inspect", store, "--json")
    summary = json.loads(out)
    assert summary["quantization"]["format"] == fmt and summary["bases_bytes"] == reader.table_bytes("bases")

    rc, _, err = run(capsys, "verify", store)
    assert rc == 0, err

    # add projects onto the quantized bases and keeps the bases file as it is.
    bases_file = m["files"]["bases"]
    rc, out, err = run(capsys, "add", store, adapters[4], "--quiet")
    assert rc == 0, err
    m2 = read_manifest(store)
    assert m2["files"]["bases"] == bases_file and m2["quantization"] == m["quantization"]
    assert m2["sha256"][bases_file] == m["sha256"][bases_file]

    # export writes what the store serves: the dequantised bases with the refitted cores.
    back = load_store(store)
    rc, _, err = run(capsys, "export", store, "task4", "--out", tmp_path / "task4")
    assert rc == 0, err
    for mod, delta in peft_deltas(str(tmp_path / "task4")).items():
        want = back.reconstruct("task4", mod).double()
        assert torch.allclose(delta, want, atol=2e-2 * float(want.abs().max()))

    # remove keeps the format (and drops the bases of a cluster left empty alike).
    rc, _, err = run(capsys, "remove", store, "task0", "task1")
    assert rc == 0, err
    again = load_store(store)
    assert all(cm.quantized is not None and cm.quantized[0].data.shape[0] == again.num_clusters
               for cm in again.modules.values())


def test_errors_recorded_are_those_of_the_quantized_bases(tmp_path, adapters):
    """The store's errors equal the reconstruction errors computed here from the adapters and what is stored."""
    store = tmp_path / "store"
    assert main(["compress", *adapters[:4], "--rank", "8", "--out", str(store), "--quiet", "--quantize", "int4",
                 "--compute-dtype", "float64", "--store-dtype", "float32"]) == 0
    back = load_store(store)
    coll = PeftCollection(adapters[:4])
    for name, cm in back.modules.items():
        f = coll.load_module(name, dtype=torch.float64)
        for i, a in enumerate(back.adapter_names):
            dW = f.dense(i).double()
            k = int(back.assignment[i])
            rec = cm.U[k].double() @ cm.core(i).double() @ cm.Vt[k].double()
            err = float(((dW - rec) ** 2).sum() / (dW**2).sum())
            assert abs(err - float(cm.rel_errors[i])) < 1e-3 * max(err, 1e-3) + 2e-4


@pytest.mark.parametrize("argv,needle", [
    (["--quantize", "int8", "--method", "svd"], "quantize (--quantize) quantizes the shared bases of JD: method must be 'full' or 'diag'"),
    (["--group-size", "32"], "group_size (--group-size) applies to quantized bases"),
    (["--quantize", "int8", "--group-size", "32"], "group_size (--group-size) applies to int4 only"),
    (["--quantize", "int4", "--group-size", "48"], "group_size (--group-size) must be one of 32, 64, 128, got 48"),
    (["--quantize", "int4", "--target-ratio", "0.2"], "quantize (--quantize) with a byte budget"),
    (["--quantize", "int4", "--store-dtype", "float64"], "store dtype, which must then be float32, float16 or bfloat16"),
])
def test_bad_quantize_arguments_are_refused_before_any_work(tmp_path, capsys, adapters, argv, needle):
    store = tmp_path / "store"
    base = ["compress", *adapters[:3], "--out", store, "--quiet"]
    if "--target-ratio" not in argv:
        base += ["--rank", 4]
    rc, out, err = run(capsys, *base, *argv)
    assert rc == 2, err
    assert needle in err, err
    assert not os.path.exists(store)


def _quantized_result(adapters, fmt="int4"):
    from jdlora_ops.compress import compress

    coll = PeftCollection(adapters[:4])
    res = compress(coll, 8, num_clusters=2, progress=False)
    quantize_bases(res, coll, fmt, 32)
    return res


def _damaged_store(tmp_path, adapters, suffix: str, damage) -> tuple[str, str]:
    """A store of quantized bases whose tensor ending in ``suffix`` went through ``damage``, with the checksum
    made to match (the values are damaged, not only the bytes); returns the store and the tensor's name."""
    from safetensors.torch import load_file, save_file

    store = tmp_path / "store"
    save_store(store, _quantized_result(adapters), dtype=torch.float32)
    m = read_manifest(store)
    f = os.path.join(store, m["files"]["bases"])
    t = load_file(f)
    key = next(k for k in t if k.endswith(suffix))
    t[key] = damage(t[key])
    save_file(t, f, metadata={"format": "jdlora-store"})
    m["sha256"][m["files"]["bases"]] = file_sha256(f)
    with open(os.path.join(store, "manifest.json"), "w") as fh:
        json.dump(m, fh)
    return store, key


def test_nonfinite_scales_in_a_store_are_refused_with_the_tensor_named(tmp_path, adapters):
    def nan_first(x):
        x = x.clone()
        x[0, 0, 0] = float("nan")
        return x

    store, key = _damaged_store(tmp_path, adapters, "::Vt_scales", nan_first)
    with pytest.raises(NonFiniteStoreError, match=key):
        load_store(store)


def test_bases_changed_after_quantization_are_not_written_as_quantized(tmp_path, adapters):
    res = _quantized_result(adapters)
    cm = next(iter(res.modules.values()))
    cm.U = cm.U * 1.5
    with pytest.raises(StoreError, match="U no longer matches its quantized form"):
        save_store(tmp_path / "store", res)
    assert not os.path.exists(tmp_path / "store")


def test_a_store_with_wrong_packed_lengths_is_refused(tmp_path, adapters):
    store, _ = _damaged_store(tmp_path, adapters, "::U", lambda x: x[..., :-1].contiguous())
    with pytest.raises(StoreError, match="must have shape"):
        load_store(store)
    with pytest.raises(StoreError, match=r"tensor .*::U is \[2, \d+, 3\] in bases-.*, the manifest implies"):
        StoreReader(store).read_module_bases(0)


def test_a_quantized_store_is_served_through_the_cache(tmp_path, adapters):
    """The serving tiers read a quantized store's bases dequantised (their quantized form is not kept on the
    device yet): each token gets the stored reconstruction of its own adapter, and base-model tokens nothing."""
    from jdlora_ops.serving import AdapterCache, BatchPlanner
    from serving_data import reference_output

    store = tmp_path / "store"
    save_store(store, _quantized_result(adapters), dtype=torch.float32)
    res = load_store(store)
    planner = BatchPlanner(AdapterCache(str(store), device="cpu", dtype=torch.float32), 64)
    names = res.adapter_names
    adapters_of_batch, counts = [names[0], None, names[-1], names[1], names[0]], [3, 2, 1, 4, 2]
    gen = torch.Generator().manual_seed(5)
    with planner.prepare(adapters_of_batch, counts) as plan:
        for spec in res.module_specs:
            x = torch.randn(plan.num_tokens, spec.d_in, generator=gen)
            y0 = torch.randn(plan.num_tokens, spec.d_out, generator=gen)
            y = y0.clone()
            plan.apply(spec.name, x, y)
            ref = reference_output(res, {}, adapters_of_batch, counts, spec.name, x, y0)
            torch.testing.assert_close(y.double(), ref, atol=2e-5, rtol=2e-5)

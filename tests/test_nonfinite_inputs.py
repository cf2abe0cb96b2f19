"""The non-finite input policy: NaN, +inf and -inf are refused at every entry point, with an error
naming the adapter, the module and the tensor, and nothing written or changed."""

from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import jdlora_ops.store as store_mod
from jdlora_ops import NonFiniteError
from jdlora_ops.cli import main as cli
from jdlora_ops.compress import CallableCollection, InMemoryCollection, ModuleSpec, compress
from jdlora_ops.compress import compress_to_store
from jdlora_ops.compress.error_budget import apply_error_budget
from jdlora_ops.peft_io import PeftCollection, write_peft_adapter
from jdlora_ops.serving import AdapterCache, AdapterMismatchError
from jdlora_ops.store import NonFiniteStoreError, StoreError, StoreReader, file_sha256, load_store, save_store
from jdlora_ops.store_update import add_to_store

pytestmark = pytest.mark.usefixtures("one_thread")

BAD = pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")],
                              ids=["nan", "+inf", "-inf"])
Q, V = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
MODULES = [ModuleSpec(Q, 16, 12), ModuleSpec(V, 8, 12)]
BASE = "tiny/base"


def _factors(seed: int, r: int = 2) -> dict:
    g = torch.Generator().manual_seed(100 + seed)
    return {m.name: (torch.randn(m.d_out, r, generator=g), torch.randn(r, m.d_in, generator=g))
            for m in MODULES}


def _peft(path, seed: int, *, poison=None, alpha=2.0) -> str:
    """A PEFT adapter directory of rank 2 on MODULES; ``poison=(module, "lora_A"|"lora_B", value)``."""
    f = _factors(seed)
    if poison is not None:
        mod, side, value = poison
        B, A = f[mod]
        (A if side == "lora_A" else B)[1, 1] = value
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": alpha, "target_modules": ["q_proj", "v_proj"],
              "base_model_name_or_path": BASE}
    return write_peft_adapter(path, f, config)


def _tree(root) -> dict:
    """Every file under ``root`` (hidden ones too) with its bytes: what must not change on a refusal."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(d, name)
            out[os.path.relpath(p, root)] = open(p, "rb").read() if os.path.isfile(p) else None
    return out


def _one_line_error(capsys, rc, *needles):
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("jdlora: error: "), err
    for n in needles:
        assert n in lines[0], lines[0]
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("nonfinite_adapters")
    return [_peft(root / f"good{i}", i) for i in range(4)]


@pytest.fixture(scope="module")
def cli_store(tmp_path_factory, adapters):
    out = str(tmp_path_factory.mktemp("nonfinite_store") / "store")
    assert cli(["compress", *adapters, "--rank", "2", "--clusters", "2", "--out", out, "-q"]) == 0
    return out


@pytest.fixture(scope="module")
def budget_store(tmp_path_factory):
    """A store with bases, cores and one adapter kept outside the joint tables (all three tensor files)."""
    g = torch.Generator().manual_seed(0)
    ads = {f"a{i}": {m.name: (torch.randn(r, m.d_in, generator=g), torch.randn(m.d_out, r, generator=g), 1.0)
                     for m in MODULES} for i, r in enumerate([1, 1, 1, 1, 3])}
    coll = InMemoryCollection(ads, modules=MODULES)
    res = compress(coll, 2, num_clusters=2)
    apply_error_budget(res, coll, 0.2)
    assert list(res.individual) == ["a4"]
    path = str(tmp_path_factory.mktemp("nonfinite_budget") / "store")
    save_store(path, res)
    return path


def _copy(store, tmp_path) -> str:
    dst = str(tmp_path / "store")
    shutil.copytree(store, dst)
    return dst


# --------------------------------------------------------------------- compress
@BAD
@pytest.mark.parametrize("side", ["lora_A", "lora_B"])
def test_compress_refuses_before_any_work(tmp_path, capsys, monkeypatch, adapters, value, side):
    bad = _peft(tmp_path / "in" / "tuned", 9, poison=(V, side, value))
    work = tmp_path / "work"
    work.mkdir()

    def no_work(*a, **k):
        raise AssertionError("compression started on a refused collection")

    monkeypatch.setattr("jdlora_ops.compress.pipeline.compress", no_work)
    rc = cli(["compress", *adapters[:2], bad, "--rank", "2", "--out", str(work / "store"), "-q"])
    _one_line_error(capsys, rc, "adapter 'tuned'", f"module {V}", f"tensor {side}", "index [1, 1]")
    assert os.listdir(work) == []  # no store, no staging directory
    with pytest.raises(NonFiniteError, match=f"adapter 'tuned', module {V}, tensor {side}"):
        compress_to_store(PeftCollection([*adapters[:2], bad]), 2, work / "store")
    assert os.listdir(work) == []


def test_compress_refuses_a_non_finite_lora_alpha(tmp_path, capsys, adapters):
    bad = _peft(tmp_path / "alpha", 5, alpha=float("inf"))  # json writes Infinity, which Python reads back
    rc = cli(["compress", adapters[0], bad, "--rank", "2", "--out", str(tmp_path / "store"), "-q"])
    _one_line_error(capsys, rc, "adapter 'alpha'", f"module {Q}", "tensor scaling (lora_alpha / r)")
    assert not os.path.exists(tmp_path / "store")


@BAD
@pytest.mark.parametrize("kind", ["in_memory", "callable"])
def test_python_compress_refuses_in_memory_collections(tmp_path, value, kind):
    ads = {f"a{i}": {m: (A, B, 0.5) for m, (B, A) in _factors(i).items()} for i in range(3)}
    ads["a1"][Q][1][2, 0] = value  # B of a1 on q_proj
    coll = InMemoryCollection(ads, modules=MODULES)
    if kind == "callable":  # the generic check, through load_module
        coll = CallableCollection(list(ads), MODULES, lambda spec, dtype, device: InMemoryCollection(
            ads, modules=MODULES).load_module(spec, dtype=dtype, device=device))
    with pytest.raises(NonFiniteError, match=f"adapter 'a1', module {Q}, tensor lora_B.*index \\[2, 0\\]"):
        compress_to_store(coll, 2, tmp_path / "store")
    assert os.listdir(tmp_path) == []


def test_distributed_compress_refuses_on_every_rank(tmp_path):
    """The owner of the bad module refuses it; the other process fails naming it; no store appears."""
    from test_distributed import launch, no_leftovers

    import dist_worker

    col = dist_worker.case_collection()
    last = col.modules[-1].name
    who = col.adapter_names[int(col.load_module(last).groups[0].index[0])]
    proc = launch(2, [{"name": "nan", "nan_on": last, "out": str(tmp_path / "nan")}], tmp_path)
    assert proc.returncode != 0
    refusal = f"NonFiniteError: adapter '{who}', module {last}, tensor lora_B (scaled)"
    assert f"CASE nan FAILED: {refusal}" in proc.stderr, proc.stderr[-3000:]
    assert f"CASE nan FAILED: RankFailed: rank 1 of 2 failed: {refusal}" in proc.stderr
    assert not os.path.exists(tmp_path / "nan") and no_leftovers(tmp_path) == []


# --------------------------------------------------------------------------- add
@BAD
def test_add_refuses_and_leaves_the_store_byte_for_byte(tmp_path, capsys, cli_store, value):
    store = _copy(cli_store, tmp_path)
    bad = _peft(tmp_path / "in" / "late", 7, poison=(Q, "lora_A", value))
    before = _tree(tmp_path / "store")
    rc = cli(["add", store, bad, "-q"])
    _one_line_error(capsys, rc, "adapter 'late'", f"module {Q}", "tensor lora_A")
    assert _tree(tmp_path / "store") == before
    ads = {"late": {m: (A, B, 1.0) for m, (B, A) in _factors(7).items()}}
    ads["late"][V][0][0, 5] = value
    with pytest.raises(NonFiniteError, match=f"adapter 'late', module {V}, tensor lora_A"):
        add_to_store(store, InMemoryCollection(ads, modules=MODULES))
    cache = AdapterCache(store, device="cpu", max_uncompressed=1, uncompressed_rank=2)
    with pytest.raises(NonFiniteError, match=f"adapter 'late', module {V}, tensor lora_A"):
        cache.add("late", ads["late"], max_rel_error=1.0, persist=True)
    assert "late" not in cache
    assert _tree(tmp_path / "store") == before


# ------------------------------------------------------------------ store reading
def _poison_store(path: str, kind: str, key: str, index: tuple, value: float) -> str:
    """Write ``value`` into one tensor of a store file, with a matching checksum and digests (a store
    written before the policy, or by another program): only the finiteness check can catch it."""
    mpath = os.path.join(path, "manifest.json")
    m = json.load(open(mpath))
    name = m["files"][kind]
    f = os.path.join(path, name)
    tensors = load_file(f)
    tensors[key] = tensors[key].clone()
    tensors[key][index] = value
    save_file(tensors, f, metadata={"format": "jdlora-store"})
    m["sha256"][name] = file_sha256(f)
    if kind != "individual":
        bases = load_file(os.path.join(path, m["files"]["bases"]))
        cores = load_file(os.path.join(path, m["files"]["cores"]))
        clusters, adapters = store_mod._table_digests(m, bases, cores, cores["assignment"], len(m["cluster_digests"]))
        m["cluster_digests"] = clusters
        for entry, digest in zip(m["adapters"], adapters):
            entry["digest"] = digest
    json.dump(m, open(mpath, "w"))
    return name


@BAD
@pytest.mark.parametrize("kind", ["bases", "cores", "individual"])
def test_store_with_non_finite_tables_is_refused_everywhere(tmp_path, capsys, budget_store, value, kind):
    store = _copy(budget_store, tmp_path)
    m = json.load(open(os.path.join(store, "manifest.json")))
    names = [a["name"] for a in m["adapters"]]
    assignment = load_file(os.path.join(store, m["files"]["cores"]))["assignment"].tolist()
    if kind == "bases":
        fname = _poison_store(store, "bases", f"{V}::Vt", (1, 0, 4), value)
        who, tensor = ", ".join(repr(n) for n, c in zip(names, assignment) if c == 1), "Vt of cluster 1"
    elif kind == "cores":
        fname = _poison_store(store, "cores", f"{Q}::sigma", (2, 1, 0), value)
        who, tensor = repr(names[2]), "sigma"
    else:
        fname = _poison_store(store, "individual", f"0::{V}::B", (3, 1), value)
        who, tensor = "'a4'", "B"
    mod = V if kind != "cores" else Q
    needle = f"{fname}: adapter{'s' if ',' in who else ''} {who}, module {mod}, tensor {tensor}"
    before = _tree(tmp_path)

    with pytest.raises(NonFiniteStoreError, match=needle.replace("(", r"\(").replace(")", r"\)")) as exc:
        load_store(store)
    assert isinstance(exc.value, StoreError) and isinstance(exc.value, NonFiniteError)
    with pytest.raises(NonFiniteStoreError, match="NaN or infinite"):
        r = StoreReader(store)  # opening reads the assignment, so the cores are checked at open
        r.read_bases(0) if kind == "bases" else r.individual_adapters()
    for lazy in (True, False):
        with pytest.raises(NonFiniteStoreError, match=f"module {mod}, tensor {tensor}"):
            cache = AdapterCache(store, lazy=lazy, device="cpu")
            cache.load([names[0]])  # the first use of the bases file

    problems = []
    status = store_mod.verify_store(store, problems=problems)
    assert status[fname] == "non-finite" and len(problems) == 1 and needle in problems[0]
    rc = cli(["verify", store])
    out = _one_line_error(capsys, rc, "1 table row(s) hold NaN or infinite values", needle)
    assert f"non-finite   {os.path.join(store, fname)}: " in out
    assert _tree(tmp_path) == before  # nothing written or repaired by any reader


def test_remove_repairs_a_store_only_when_what_remains_is_finite(tmp_path, capsys, budget_store):
    store = _copy(budget_store, tmp_path)
    m = json.load(open(os.path.join(store, "manifest.json")))
    assignment = load_file(os.path.join(store, m["files"]["cores"]))["assignment"].tolist()
    _poison_store(store, "cores", f"{V}::sigma", (0, 0, 0), float("nan"))
    _poison_store(store, "bases", f"{Q}::U", (1, 0, 0), float("inf"))
    members = [a["name"] for a, c in zip(m["adapters"], assignment) if c == 1]
    assert len(members) > 1 and "a0" not in members
    before = _tree(tmp_path)
    rc = cli(["remove", store, "a0", members[0]])  # cluster 1 keeps an adapter, so its bad bases stay
    _one_line_error(capsys, rc, "not written", "tensor U of cluster 1")
    assert _tree(tmp_path) == before
    assert cli(["remove", store, "a0", *members]) == 0  # the bad core and the bad cluster go
    capsys.readouterr()
    back = load_store(store)
    assert "a0" not in back.adapter_names and back.num_clusters == 1
    assert cli(["verify", store]) == 0


def test_reader_scans_each_file_once(tmp_path, monkeypatch, budget_store):
    calls = []
    real = store_mod._require_finite_tables

    def spy(where, m, kind, *a):
        calls.append(kind)
        return real(where, m, kind, *a)

    monkeypatch.setattr(store_mod, "_require_finite_tables", spy)
    r = StoreReader(budget_store)
    for i in range(3):
        r.read_cores(i)
        r.read_bases(i % 2)
        r.read_module_bases(0)
    r.individual_adapters()
    r.individual_adapters()
    assert calls == ["cores", "bases", "individual"]


@BAD
@pytest.mark.parametrize("update", [False, True])
def test_save_store_refuses_non_finite_tables(tmp_path, budget_store, value, update):
    c = load_store(budget_store)
    c.modules[V].sigma[3, 0] = value
    path = _copy(budget_store, tmp_path) if update else str(tmp_path / "store")
    before = _tree(tmp_path)
    match = f"{path}: not written: adapter 'a3', module {V}, tensor sigma"
    with pytest.raises(NonFiniteStoreError, match=match):
        save_store(path, c, update=update, reuse_bases=update)
    assert _tree(tmp_path) == before


def test_a_narrower_store_dtype_that_overflows_is_refused(tmp_path, budget_store):
    c = load_store(budget_store)
    c.modules[Q].U[0, 0, 0] = 1e6  # finite in float32, +inf in float16
    with pytest.raises(NonFiniteStoreError, match=f"module {Q}, tensor U of cluster 0.*1 \\+inf"):
        save_store(tmp_path / "store", c, dtype=torch.float16)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------ AdapterCache registration
@BAD
@pytest.mark.parametrize("side", ["lora_A", "lora_B", "scale"])
def test_cache_refuses_non_finite_uncompressed_adapters(tmp_path, budget_store, value, side):
    cache = AdapterCache(budget_store, device="cpu", max_uncompressed=2, uncompressed_rank=3)
    names = list(cache.adapter_names)
    f = {m: (A.clone(), B.clone(), 1.0) for m, (B, A) in _factors(3).items()}
    A, B, s = f[Q]
    if side == "scale":
        s = value
    else:
        (A if side == "lora_A" else B)[0, 1] = value
    f[Q] = (A, B, s)
    match = f"adapter 'new', module {Q}, tensor {side}: expected finite values"
    for call in (lambda: cache.register_uncompressed("new", f),
                 lambda: cache.add("new", f, max_rel_error=1.0)):
        with pytest.raises(NonFiniteError, match=match) as exc:
            call()
        assert isinstance(exc.value, AdapterMismatchError)
    assert cache.adapter_names == names
    if side != "scale":
        bad = _peft(tmp_path / "peft_bad", 3, poison=(Q, side, value))
        with pytest.raises(NonFiniteError, match=f"adapter 'peft_bad', module {Q}, tensor {side}"):
            cache.register_peft(bad)
        assert cache.adapter_names == names


# ------------------------------------------------------------------- vLLM plugin
@BAD
def test_vllm_plugin_refuses_non_finite_peft_adapters(monkeypatch, budget_store, value):
    from jdlora_ops.integrations.vllm import state as st

    a, b = torch.randn(2, 12), torch.randn(16, 2)
    b[4, 1] = value
    model = SimpleNamespace(loras={Q: SimpleNamespace(lora_a=[torch.randn(2, 12), None], lora_b=[None, b])})
    req = SimpleNamespace(lora_name="user1", lora_path="/adapters/user1")
    monkeypatch.delenv(st.ENV_STORE, raising=False)
    st.check_peft_adapter(req, model)  # idle without a store, as the rest of the plugin
    monkeypatch.setenv(st.ENV_STORE, budget_store)
    with pytest.raises(NonFiniteError, match=f"/adapters/user1: adapter 'user1', module {Q}, tensor lora_b.*"
                                             r"index \[4, 1\]"):
        st.check_peft_adapter(req, model)
    good = SimpleNamespace(loras={Q: SimpleNamespace(lora_a=a, lora_b=torch.randn(16, 2))})
    st.check_peft_adapter(req, good)


def _fake_vllm(monkeypatch, loaded):
    """The few vLLM 0.32 names the plugin's hooks patch, as stand-ins (vLLM is not installed here);
    ``WorkerLoRAManager._load_adapter`` returns ``loaded``."""
    import sys
    import types

    from jdlora_ops.integrations import vllm as plugin
    from jdlora_ops.integrations.vllm import _vllm_private as vp

    class Platform:
        @classmethod
        def get_punica_wrapper(cls):
            return "platform wrapper"

    # With the signatures the plugin checks before it patches anything.
    def from_layer(layer, max_loras, lora_config, packed_modules_list, model_config=None):
        return None

    def _create_lora_modules(self):
        return None

    def _load_adapter(self, lora_request):
        return loaded

    def set_active_adapters(self, requests, mapping):
        pass

    def _validate_lora(self, lora_request):
        return None

    found = {
        "vllm": {"__version__": "0.32.0"}, "vllm.lora": {}, "vllm.v1": {}, "vllm.v1.engine": {},
        "vllm.lora.model_manager": {"from_layer": from_layer,
                                    "LoRAModelManager": type("LoRAModelManager", (), {
                                        "_create_lora_modules": _create_lora_modules})},
        "vllm.lora.worker_manager": {"WorkerLoRAManager": type("WorkerLoRAManager", (), {
            "_load_adapter": _load_adapter, "set_active_adapters": set_active_adapters})},
        "vllm.platforms": {"current_platform": Platform()},
        "vllm.v1.engine.input_processor": {"InputProcessor": type("InputProcessor", (), {
            "_validate_lora": _validate_lora})},
    }
    mods = {name: types.ModuleType(name) for name in found}
    for name, attrs in found.items():
        for k, v in attrs.items():
            setattr(mods[name], k, v)
        parent, _, leaf = name.rpartition(".")
        if parent:
            setattr(mods[parent], leaf, mods[name])
        monkeypatch.setitem(sys.modules, name, mods[name])
    monkeypatch.setattr(vp, "_INSTALLED", False)
    monkeypatch.setattr(plugin, "_REGISTERED", False)
    return plugin, mods


def test_vllm_worker_hook_refuses_what_vllm_loaded(monkeypatch):
    """register() wires the check into vLLM's adapter loading: a PEFT adapter vLLM read itself is
    refused before it can get a slot (a store adapter never reaches vLLM's loader)."""
    from jdlora_ops.integrations.vllm import state as st

    b = torch.randn(8, 2)
    b[0, 1] = float("nan")
    model = SimpleNamespace(loras={V: SimpleNamespace(lora_a=torch.randn(2, 12), lora_b=b)})
    monkeypatch.delenv(st.ENV_STORE, raising=False)
    plugin, mods = _fake_vllm(monkeypatch, model)
    plugin.register()
    worker = mods["vllm.lora.worker_manager"].WorkerLoRAManager()
    req = SimpleNamespace(lora_name="user3", lora_path="/adapters/user3", lora_int_id=7)
    assert worker._load_adapter(req) is model  # idle without a store
    monkeypatch.setenv(st.ENV_STORE, "/nowhere/store")
    with pytest.raises(NonFiniteError, match=f"adapter 'user3', module {V}, tensor lora_b"):
        worker._load_adapter(req)


@BAD
def test_vllm_front_end_refuses_a_non_finite_peft_request(tmp_path, monkeypatch, budget_store, adapters, value):
    """In the front end, so that the request fails alone (a refusal in a worker stops the engine)."""
    from jdlora_ops.integrations.vllm import state as st

    bad = _peft(tmp_path / "user2", 4, poison=(V, "lora_A", value))
    req = SimpleNamespace(lora_name="user2", lora_path=bad)
    monkeypatch.delenv(st.ENV_STORE, raising=False)
    monkeypatch.delenv(st.ENV_STORE_ONLY, raising=False)
    monkeypatch.setattr(st, "_FINITE_CACHE", {})
    st.validate_request(req, {})  # idle without a store
    monkeypatch.setenv(st.ENV_STORE, budget_store)
    for _ in range(2):  # the second answer comes from the cache
        with pytest.raises(ValueError, match=f"'user2'.*adapter 'user2', module {V}, tensor lora_A"):
            st.validate_request(req, {})
    assert list(st._FINITE_CACHE.values()).count(None) == 0 and len(st._FINITE_CACHE) == 1
    st.validate_request(SimpleNamespace(lora_name="good0", lora_path=adapters[0]), {})


def test_vllm_tables_refuse_a_store_with_non_finite_bases(tmp_path, budget_store):
    from jdlora_ops.integrations.vllm.tables import LayerTables

    store = _copy(budget_store, tmp_path)
    _poison_store(store, "bases", f"{Q}::U", (0, 3, 1), float("nan"))
    r = StoreReader(store)
    geometry = {"output_slices": (16,), "input_size": 12, "tp_rank": 0, "tp_size": 1, "output_shards": ((0, 1),),
                "dtype": torch.float32, "device": torch.device("cpu")}
    with pytest.raises(NonFiniteStoreError, match=f"module {Q}, tensor U of cluster 0"):
        LayerTables("model.layers.0.self_attn.q_proj", "column", [Q], r, {Q: 0, V: 1}, geometry, 2)

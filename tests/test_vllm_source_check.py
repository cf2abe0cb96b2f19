"""The ast check of the vLLM names the vLLM plugin relies on, run on fake source trees.

vLLM is not installed in this environment and nothing here imports it: the
check parses files. The trees are written from the plugin's own table
(:data:`SURFACE`), one stub per expectation, then altered the way a vLLM
release would alter them (a method removed, a signature changed, a call site
gone, an override added, a module moved).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import textwrap

import pytest

from jdlora_ops.integrations.vllm import _vllm_private as vp
from jdlora_ops.integrations.vllm._source_check import (
    Expect,
    check_source_tree,
    render_ast_signature,
    render_signature,
)


def _def(name: str, params: str | None, body: list[str], indent: str) -> list[str]:
    params = "self" if params is None and indent else (params or "")
    decorators = []
    while params.startswith("@"):
        deco, _, params = params.partition(" ")
        decorators.append(indent + deco)
    args = ", ".join(p + "None" if p.endswith("=") else p for p in params.split(", ")) if params else ""
    return [*decorators, f"{indent}def {name}({args}):", *(indent + "    " + b for b in body or ["pass"])]


def write_tree(root, expectations, version: str = "0.33.0") -> str:
    """A ``vllm`` package under ``root`` meeting every one of ``expectations`` with stubs."""
    modules: dict[str, dict] = {}
    for e in expectations:
        mod = modules.setdefault(e.module, {"funcs": {}, "names": set(), "classes": {}})
        cls_name, _, member = e.name.partition(".")
        calls = [f"{c}()" for c in e.calls]
        if member:
            cls = mod["classes"].setdefault(cls_name, {"methods": {}, "attrs": []})
            if not e.absent:
                params, body = cls["methods"].get(member, (None, []))
                cls["methods"][member] = (e.params if e.params is not None else params, body + calls)
        elif e.attrs or e.name[:1].isupper():
            cls = mod["classes"].setdefault(e.name, {"methods": {}, "attrs": []})
            cls["attrs"] += list(e.attrs)
        elif e.params is not None or e.calls:
            mod["funcs"][e.name] = (e.params, calls)
        else:
            mod["names"].add(e.name)
    packages = {m for m in modules for other in modules if other.startswith(m + ".")}
    for module, mod in modules.items():
        lines = [f"{name} = None" for name in sorted(mod["names"])]
        for name, (params, body) in mod["funcs"].items():
            lines += _def(name, params, body, "")
        for cls_name, cls in mod["classes"].items():
            lines.append(f"class {cls_name}:")
            methods = dict(cls["methods"])
            if cls["attrs"]:
                params, body = methods.get("__init__", (None, []))
                methods["__init__"] = (params, [f"self.{a} = None" for a in cls["attrs"]] + body)
            for name, (params, body) in methods.items():
                lines += _def(name, params, body, "    ")
            if not methods:
                lines.append("    pass")
        parts = module.split(".")
        path = os.path.join(root, *parts, "__init__.py") if module in packages else \
            os.path.join(root, *parts[:-1], parts[-1] + ".py")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            fh.write("\n".join(lines) + "\n")
    for dirpath, _, files in os.walk(os.path.join(root, "vllm")):
        if "__init__.py" not in files:
            open(os.path.join(dirpath, "__init__.py"), "w").close()
    with open(os.path.join(root, "vllm", "_version.py"), "w") as fh:
        fh.write(f"__version__ = version = {version!r}\n")
    return str(root)


def _replace(where: str, **changes) -> list[Expect]:
    out, hit = [], False
    for e in vp.SURFACE:
        if e.where == where and (e.params is not None or "params" not in changes):
            e, hit = dataclasses.replace(e, **changes), True
        out.append(e)
    assert hit, where
    return out


def test_tree_written_from_the_table_meets_it(tmp_path):
    root = write_tree(tmp_path, vp.SURFACE)
    assert vp.check_sources(root) == ("0.33.0", [])
    assert vp.check_sources(os.path.join(root, "vllm")) == ("0.33.0", [])  # the package folder itself works too
    assert "vllm" not in sys.modules


def test_missing_method_is_reported(tmp_path):
    gone = "vllm.lora.worker_manager.WorkerLoRAManager._load_adapter"
    root = write_tree(tmp_path, [e for e in vp.SURFACE if e.where != gone])
    _, problems = vp.check_sources(root)
    assert problems == [f"{gone}: method _load_adapter not found in class WorkerLoRAManager"]


def test_missing_module_level_name_is_reported(tmp_path):
    root = write_tree(tmp_path, [e for e in vp.SURFACE if e.where != "vllm.lora.model_manager.from_layer"])
    _, problems = vp.check_sources(root)
    assert problems == ["vllm.lora.model_manager.from_layer: name from_layer not found in module "
                        "vllm.lora.model_manager"]


def test_changed_signature_is_reported(tmp_path):
    where = "vllm.lora.utils.from_layer"
    root = write_tree(tmp_path, _replace(where, params="layer, max_loras, lora_config, *, packed_modules_list"))
    _, problems = vp.check_sources(root)
    assert problems == [f"{where}: signature changed: expected (layer, max_loras, lora_config, packed_modules_list, "
                        "model_config=), found (layer, max_loras, lora_config, *, packed_modules_list)"]


def test_classmethod_turned_into_a_plain_method_is_reported(tmp_path):
    where = "vllm.platforms.cpu.CpuPlatform.get_punica_wrapper"
    root = write_tree(tmp_path, _replace(where, params="self"))
    _, problems = vp.check_sources(root)
    assert problems == [f"{where}: signature changed: expected (@classmethod cls), found (self)"]


def test_call_site_that_no_longer_reaches_the_patch_is_reported(tmp_path):
    where = "vllm.lora.model_manager.LoRAModelManager._create_lora_modules"
    root = write_tree(tmp_path, _replace(where, calls=("utils.from_layer",)))
    _, problems = vp.check_sources(root)
    assert problems == [f"{where}: no longer calls ['from_layer'] (the patch would not be reached)"]


def test_subclass_override_of_a_patched_method_is_reported(tmp_path):
    override = Expect("vllm.lora.worker_manager", "LRUCacheWorkerLoRAManager._load_adapter", "self, lora_request")
    root = write_tree(tmp_path, [*vp.SURFACE, override])
    _, problems = vp.check_sources(root)
    assert problems == ["vllm.lora.worker_manager.LRUCacheWorkerLoRAManager._load_adapter: LRUCacheWorkerLoRAManager "
                        "now defines _load_adapter itself, which bypasses the patch on its base class"]


def test_attribute_no_longer_set_and_moved_module_are_reported(tmp_path):
    where = "vllm.lora.layers.base_linear.BaseLinearLayerWithLoRA"
    attrs = next(e.attrs for e in vp.SURFACE if e.where == where and e.attrs)
    root = write_tree(tmp_path, _replace(where, attrs=tuple(a for a in attrs if a != "tp_rank")))
    os.remove(os.path.join(root, "vllm", "lora", "request.py"))
    _, problems = vp.check_sources(root)
    assert problems == [f"{where}: attributes no longer set by the class: ['tp_rank']",
                        f"vllm.lora.request.LoRARequest: module vllm.lora.request not found under {root}"]


def test_main_reports_and_exits_nonzero_on_problems(tmp_path, capsys):
    good = write_tree(tmp_path / "good", vp.SURFACE, version="0.32.0")
    assert vp.main([good]) == 0
    assert (f"vLLM 0.32.0 at {good}, inside the supported range >=0.32.0,<0.34.0 (0.32.x, 0.33.x): all "
            f"{len(vp.SURFACE)} expectations met") in capsys.readouterr().out
    bad = write_tree(tmp_path / "bad", _replace("vllm.v1.engine.input_processor.InputProcessor._validate_lora",
                                                params="self, lora_request, tokenizer="), version="0.34.0")
    assert vp.main([bad]) == 1
    out = capsys.readouterr().out
    assert "vLLM 0.34.0" in out and "outside the supported range" in out and "1 problem(s)" in out
    assert "InputProcessor._validate_lora: signature changed: expected (self, lora_request), found (self, " \
           "lora_request, tokenizer=)" in out


def test_source_root_must_hold_the_package(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"expected the 'vllm' package folder or a folder holding it"):
        vp.check_sources(str(tmp_path))


def test_hand_written_tree(tmp_path):
    """The checker on a tree written by hand (not from the table), against a small table."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .sub.mod import helper as exported\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "mod.py").write_text(textwrap.dedent('''
        from typing import TYPE_CHECKING, overload
        if TYPE_CHECKING:
            declared: int

        def helper(a, /, b, *args, c, d=1, **kw):
            return other(a)

        class Base:
            size: int = 0

            def __init__(self, x):
                self.x, self.y = x, 2
                self.z: int

            @overload
            def f(self, a: int) -> int: ...
            def f(self, a, b=None):
                return self.g(a)

            @property
            def p(self):
                return 1

            @p.setter
            def p(self, value):
                pass

        class Child(Base):
            pass
    '''))
    table = [
        Expect("pkg", "exported"),
        Expect("pkg.sub.mod", "declared"),
        Expect("pkg.sub.mod", "helper", "a, /, b, *args, c, d=, **kw", calls=("other",)),
        Expect("pkg.sub.mod", "Base", attrs=("size", "x", "y", "z", "p")),
        Expect("pkg.sub.mod", "Base.f", "self, a, b=", calls=("self.g",)),
        Expect("pkg.sub.mod", "Base.p", "@property self"),
        Expect("pkg.sub.mod", "Child.f", absent=True),
    ]
    assert check_source_tree(str(tmp_path), table) == []
    table_off = [
        Expect("pkg.sub.mod", "helper", "a, b, *args, c, d=, **kw", calls=("self.other",)),
        Expect("pkg.sub.mod", "Base", attrs=("w",)),
        Expect("pkg.sub.mod", "Base.f", "self, a"),
        Expect("pkg.sub.mod", "Base.f", absent=True),
        Expect("pkg.sub.mod", "Gone.f"),
        Expect("pkg.other", "anything"),
    ]
    assert check_source_tree(str(tmp_path), table_off) == [
        "pkg.sub.mod.helper: signature changed: expected (a, b, *args, c, d=, **kw), found (a, /, b, *args, c, d=, "
        "**kw)",
        "pkg.sub.mod.helper: no longer calls ['self.other'] (the patch would not be reached)",
        "pkg.sub.mod.Base: attributes no longer set by the class: ['w']",
        "pkg.sub.mod.Base.f: signature changed: expected (self, a), found (self, a, b=)",
        "pkg.sub.mod.Base.f: Base now defines f itself, which bypasses the patch on its base class",
        "pkg.sub.mod.Gone.f: class Gone not found in module pkg.sub.mod",
        f"pkg.other.anything: module pkg.other not found under {tmp_path}",
    ]


def _live(a, /, b, *args, c, d=1, **kw):
    pass


class _Live:
    @classmethod
    def make(cls):
        pass

    def method(self, x, *, y=None):
        pass


def test_live_and_parsed_signatures_read_the_same():
    import ast
    import inspect

    tree = ast.parse(textwrap.dedent(inspect.getsource(_live)) + textwrap.dedent(inspect.getsource(_Live)))
    parsed_live, parsed_cls = tree.body
    assert render_ast_signature(parsed_live) == render_signature(_live) == "a, /, b, *args, c, d=, **kw"
    make, method = parsed_cls.body
    assert render_ast_signature(make) == render_signature(_Live.__dict__["make"].__func__, "classmethod") \
        == "@classmethod cls"
    assert render_ast_signature(method) == render_signature(_Live.method) == "self, x, *, y="

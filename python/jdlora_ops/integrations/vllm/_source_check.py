"""Checks a Python package's source against a table of expected names, with ``ast`` only.

The table itself (which vLLM names the plugin relies on) lives in
:mod:`._vllm_private`; this module knows nothing of vLLM. Nothing is
imported from the checked package, so a source tree that cannot be imported
here (a GPU-only wheel unpacked on a CPU machine) is checked just as well.

Signatures are compared in one canonical text form, written the way a
``def`` line reads: ``"self, lora_request"``, ``"self, y, x, *, buffer=,
**kwargs"`` (``name=``: the parameter has a default, whatever it is;
``/`` and ``*`` as in Python), with ``@classmethod`` / ``@staticmethod`` /
``@property`` in front when the method carries one (they change how it is
called). :func:`render_signature` gives the same form for a live function.
"""

from __future__ import annotations

import ast
import inspect
import os
from dataclasses import dataclass

__all__ = ["Expect", "check_source_tree", "find_module_file", "render_ast_signature", "render_signature",
           "source_version"]

_CALL_DECORATORS = ("classmethod", "staticmethod", "property")


@dataclass(frozen=True)
class Expect:
    """One expectation about ``module``'s source.

    ``name``: ``"func"``, ``"Class"`` or ``"Class.method"``. ``params``: the
    canonical signature of that ``def`` (``None``: any definition, or any
    binding of a module-level name, e.g. an import). ``attrs``: for a class,
    names its body declares or its methods assign to ``self``. ``calls``: for a
    ``def``, calls its body must make, as written (``"from_layer"``,
    ``"self._load_adapter"``). ``absent``: the class must *not* define the
    method (a subclass override would bypass a patch on the base class).
    ``why``: what the plugin does with the name, for the report.
    """

    module: str
    name: str
    params: str | None = None
    attrs: tuple[str, ...] = ()
    calls: tuple[str, ...] = ()
    absent: bool = False
    why: str = ""

    @property
    def where(self) -> str:
        return f"{self.module}.{self.name}"


def _package_dir(root: str, top: str) -> str:
    """``root`` may be the package folder itself or the folder holding it."""
    root = os.path.abspath(os.fspath(root))
    if os.path.basename(root.rstrip(os.sep)) == top and os.path.isfile(os.path.join(root, "__init__.py")):
        return root
    candidate = os.path.join(root, top)
    if os.path.isfile(os.path.join(candidate, "__init__.py")):
        return candidate
    raise FileNotFoundError(f"source root {root}: expected the {top!r} package folder or a folder holding it "
                            f"(with {top}/__init__.py), found neither")


def find_module_file(root: str, module: str) -> str | None:
    """The source file of dotted ``module`` under ``root`` (``None`` when there is none)."""
    top, *rest = module.split(".")
    base = os.path.join(_package_dir(root, top), *rest)
    for path in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(path):
            return path
    return None


def source_version(root: str, top: str) -> str | None:
    """``__version__`` as written in ``top/_version.py`` or ``top/__init__.py`` (``None`` when not a literal)."""
    pkg = _package_dir(root, top)
    for name in ("_version.py", "__init__.py"):
        path = os.path.join(pkg, name)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as fh:
            tree = ast.parse(fh.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
                if "__version__" in names and isinstance(node.value.value, str):
                    return node.value.value
    return None


# --- signatures -------------------------------------------------------------

def _decorators(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    out = []
    for d in fn.decorator_list:
        name = d.id if isinstance(d, ast.Name) else d.attr if isinstance(d, ast.Attribute) else None
        if name in _CALL_DECORATORS:
            out.append("@" + name)
    return out


def render_ast_signature(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """The canonical signature (see the module docstring) of a parsed ``def``."""
    a = fn.args
    parts: list[str] = []
    positional = [*a.posonlyargs, *a.args]
    first_default = len(positional) - len(a.defaults)
    for i, arg in enumerate(positional):
        parts.append(arg.arg + ("=" if i >= first_default else ""))
        if a.posonlyargs and i == len(a.posonlyargs) - 1:
            parts.append("/")
    if a.vararg is not None:
        parts.append("*" + a.vararg.arg)
    elif a.kwonlyargs:
        parts.append("*")
    for arg, default in zip(a.kwonlyargs, a.kw_defaults):
        parts.append(arg.arg + ("=" if default is not None else ""))
    if a.kwarg is not None:
        parts.append("**" + a.kwarg.arg)
    return " ".join([*_decorators(fn), ", ".join(parts)]).strip()


def render_signature(func, decorator: str | None = None) -> str:
    """The canonical signature of a live function, as its callers see it (through ``functools.wraps``).

    ``decorator``: ``"classmethod"`` etc. when the function was defined under one.
    """
    params = inspect.signature(func).parameters.values()
    parts: list[str] = []
    kinds = [p.kind for p in params]
    star_done = False
    for i, p in enumerate(params):
        if p.kind is p.KEYWORD_ONLY and not star_done:
            parts.append("*")
            star_done = True
        if p.kind is p.VAR_POSITIONAL:
            parts.append("*" + p.name)
            star_done = True
        elif p.kind is p.VAR_KEYWORD:
            parts.append("**" + p.name)
        else:
            parts.append(p.name + ("=" if p.default is not p.empty else ""))
        if p.kind is p.POSITIONAL_ONLY and (i + 1 == len(kinds) or kinds[i + 1] is not p.POSITIONAL_ONLY):
            parts.append("/")
    prefix = f"@{decorator} " if decorator else ""
    return (prefix + ", ".join(parts)).strip()


# --- one parsed file --------------------------------------------------------

def _top_level(body: list[ast.stmt]):
    """Statements at module level, also those under module-level ``if`` / ``try`` (``TYPE_CHECKING`` blocks)."""
    for node in body:
        if isinstance(node, ast.If):
            yield from _top_level(node.body)
            yield from _top_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _top_level(block)
        else:
            yield node


def _target_names(target: ast.expr, self_attrs: bool) -> list[str]:
    if isinstance(target, (ast.Tuple, ast.List)):
        return [n for t in target.elts for n in _target_names(t, self_attrs)]
    if not self_attrs and isinstance(target, ast.Name):
        return [target.id]
    if (self_attrs and isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
            and target.value.id == "self"):
        return [target.attr]
    return []


def _assigned(node: ast.AST, self_attrs: bool) -> list[str]:
    if isinstance(node, ast.Assign):
        return [n for t in node.targets for n in _target_names(t, self_attrs)]
    if isinstance(node, (ast.AnnAssign, ast.AugAssign)):
        return _target_names(node.target, self_attrs)
    return []


class _Module:
    def __init__(self, path: str):
        with open(path, encoding="utf-8") as fh:
            self.tree = ast.parse(fh.read(), path)
        self.names: dict[str, ast.AST] = {}
        self.classes: dict[str, ast.ClassDef] = {}
        for node in _top_level(self.tree.body):
            if isinstance(node, ast.ClassDef):
                self.classes[node.name] = node
                self.names[node.name] = node
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.names[node.name] = node
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias in node.names:
                    self.names[alias.asname or alias.name.split(".")[0]] = node
            else:
                for n in _assigned(node, self_attrs=False):
                    self.names[n] = node

    @staticmethod
    def methods(cls: ast.ClassDef) -> dict[str, ast.FunctionDef | ast.AsyncFunctionDef]:
        out = {}
        for node in _top_level(cls.body):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            decorators = [ast.unparse(d) for d in node.decorator_list]
            # @overload stubs and property setters are not what a call runs.
            if any(d.endswith(("overload", ".setter", ".deleter")) for d in decorators):
                continue
            out.setdefault(node.name, node)
        return out

    @staticmethod
    def class_attrs(cls: ast.ClassDef) -> set[str]:
        out: set[str] = set()
        for node in _top_level(cls.body):
            out.update(_assigned(node, self_attrs=False))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.add(node.name)
                for inner in ast.walk(node):
                    out.update(_assigned(inner, self_attrs=True))
        return out


def _calls(fn: ast.AST) -> set[str]:
    return {ast.unparse(node.func) for node in ast.walk(fn) if isinstance(node, ast.Call)}


def _check_one(mod: _Module, e: Expect) -> list[str]:
    cls_name, _, member = e.name.partition(".")
    if member:
        cls = mod.classes.get(cls_name)
        if cls is None:
            return [f"{e.where}: class {cls_name} not found in module {e.module}"]
        defined = mod.methods(cls)
        if e.absent:
            return [f"{e.where}: {cls_name} now defines {member} itself, which bypasses the patch on its base class"] \
                if member in defined else []
        node = defined.get(member)
        if node is None:
            return [f"{e.where}: method {member} not found in class {cls_name}"]
    else:
        node = mod.names.get(e.name)
        if e.absent:
            return [f"{e.where}: defined in {e.module}, expected not to be"] if node is not None else []
        if node is None:
            return [f"{e.where}: name {e.name} not found in module {e.module}"]
    problems = []
    if e.params is not None:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            problems.append(f"{e.where}: expected a def with parameters ({e.params}), found {type(node).__name__}")
        else:
            found = render_ast_signature(node)
            if found != e.params:
                problems.append(f"{e.where}: signature changed: expected ({e.params}), found ({found})")
    if e.attrs:
        if not isinstance(node, ast.ClassDef):
            problems.append(f"{e.where}: expected a class with attributes {list(e.attrs)}, found "
                            f"{type(node).__name__}")
        else:
            have = mod.class_attrs(node)
            missing = [a for a in e.attrs if a not in have]
            if missing:
                problems.append(f"{e.where}: attributes no longer set by the class: {missing}")
    if e.calls:
        made = _calls(node)
        missing = [c for c in e.calls if c not in made]
        if missing:
            problems.append(f"{e.where}: no longer calls {missing} (the patch would not be reached)")
    return problems


def check_source_tree(root: str, expectations) -> list[str]:
    """Every expectation ``root`` does not meet, one line each (``[]``: all met)."""
    problems: list[str] = []
    parsed: dict[str, _Module | None] = {}
    for e in expectations:
        if e.module not in parsed:
            path = find_module_file(root, e.module)
            parsed[e.module] = _Module(path) if path is not None else None
        mod = parsed[e.module]
        if mod is None:
            problems.append(f"{e.where}: module {e.module} not found under {root}")
            continue
        problems.extend(_check_one(mod, e))
    return problems

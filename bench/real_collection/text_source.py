"""Real English text for the adapter collection: docstrings of Python modules, labelled by module.

Sentences come from the docstrings (module, class, function) in the source
files of the Python standard library and of numpy, read with ``ast`` (no code
is imported or run). Paragraphs holding code examples (``>>>``, ``...``) are
skipped; the rest is whitespace-normalised and split into sentences. A
sentence is kept when it has 6 to 50 words and starts with a capital letter;
a sentence found under two labels is dropped (it would be ambiguous).

Each sentence gets one split from a hash of its text, the same for every task:
``train`` (60%), ``eval`` (25%) and ``calib`` (15%). So eval text is disjoint
from every task's training text, and calibration text from both.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import importlib.util
import os
import re
import sysconfig

# family -> label -> modules whose source files hold the label's docstrings.
FAMILIES: dict[str, dict[str, list[str]]] = {
    "files": {
        "os": ["os", "posixpath", "genericpath"],
        "shutil": ["shutil", "tempfile"],
        "pathlib": ["pathlib", "glob", "fnmatch"],
        "tarfile": ["tarfile"],
        "zipfile": ["zipfile", "zipimport"],
        "io": ["io", "_pyio"],
    },
    "network": {
        "socket": ["socket", "ssl", "selectors"],
        "http": ["http"],
        "urllib": ["urllib"],
        "email": ["email"],
        "mail_transfer": ["smtplib", "imaplib", "poplib", "ftplib"],
    },
    "concurrency": {
        "threading": ["threading"],
        "multiprocessing": ["multiprocessing"],
        "asyncio": ["asyncio"],
        "futures_queue": ["concurrent", "queue", "sched"],
        "subprocess": ["subprocess", "signal"],
    },
    "numeric": {
        "statistics": ["statistics", "fractions", "numbers", "random"],
        "decimal": ["_pydecimal"],
        "numpy_linalg": ["numpy.linalg"],
        "numpy_polynomial": ["numpy.polynomial"],
        "numpy_masked": ["numpy.ma"],
    },
    "text": {
        "regex": ["re", "sre_compile", "sre_parse"],
        "difflib": ["difflib", "filecmp"],
        "codecs": ["codecs", "encodings"],
        "i18n": ["gettext", "locale", "textwrap", "string"],
        "parsing": ["tokenize", "shlex", "html", "configparser"],
    },
}

SPLITS = ("train", "eval", "calib")
_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODE = re.compile(r"^\s*(>>>|\.\.\.|\$ )", re.M)


def module_files(name: str) -> list[str]:
    """The .py source files of a module or package (tests excluded)."""
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise ModuleNotFoundError(f"text source module {name!r} is not installed")
    if spec.submodule_search_locations:
        files = [f for loc in spec.submodule_search_locations
                 for f in glob.glob(os.path.join(loc, "**", "*.py"), recursive=True)]
        return sorted(f for f in files if f"{os.sep}tests{os.sep}" not in f and f"{os.sep}test" not in f)
    origin = spec.origin
    if origin == "frozen":  # os, posixpath, ... are frozen into the interpreter; their sources stay in the stdlib
        origin = os.path.join(sysconfig.get_paths()["stdlib"], *name.split(".")) + ".py"
    if not origin or not origin.endswith(".py") or not os.path.isfile(origin):
        raise ValueError(f"text source module {name!r} has no Python source ({spec.origin})")
    return [origin]


def docstring_sentences(path: str) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read(), filename=path)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        for para in re.split(r"\n\s*\n", doc or ""):
            if _CODE.search(para):
                continue
            for s in _SENT.split(" ".join(para.split())):
                if 6 <= len(s.split()) <= 50 and s[0].isupper():
                    out.append(s)
    return out


def split_of(sentence: str) -> str:
    h = int(hashlib.sha1(sentence.encode("utf-8")).hexdigest()[:8], 16) % 20
    return "train" if h < 12 else "eval" if h < 17 else "calib"


def extract() -> list[dict]:
    """Rows ``{"family", "label", "split", "text"}``, sorted, duplicates across labels dropped."""
    seen: dict[str, set] = {}
    rows = []
    for family, labels in FAMILIES.items():
        for label, mods in labels.items():
            for s in sorted({s for m in mods for f in module_files(m) for s in docstring_sentences(f)}):
                seen.setdefault(s, set()).add((family, label))
    for s, owners in sorted(seen.items()):
        if len(owners) == 1:
            (family, label), = owners
            rows.append({"family": family, "label": label, "split": split_of(s), "text": s})
    rows.sort(key=lambda r: (r["family"], r["label"], r["split"], r["text"]))
    return rows

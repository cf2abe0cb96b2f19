"""The vLLM entry point module (outside the jdlora_ops package) when jdlora_ops cannot be imported.

vLLM is not needed: the entry point imports nothing of vLLM before it hands
over to jdlora_ops.integrations.vllm, which is made unimportable here.
"""

from __future__ import annotations

import logging
import sys

import pytest

import jdlora_ops_vllm


@pytest.fixture
def unimportable(monkeypatch):
    # A None entry in sys.modules makes the import raise ImportError.
    monkeypatch.setitem(sys.modules, "jdlora_ops.integrations.vllm", None)


def test_store_configured_and_jdlora_unimportable_raises(unimportable, monkeypatch, tmp_path):
    monkeypatch.setenv("JDLORA_STORE", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"jdlora_ops vLLM plugin: jdlora_ops cannot be imported \(ModuleNotFoundError: .*\)\. "
                                           rf"A jdlora store is configured \({tmp_path}\), so the engine does not start"):
        jdlora_ops_vllm.register()


def test_no_store_and_jdlora_unimportable_only_warns(unimportable, monkeypatch, caplog):
    monkeypatch.delenv("JDLORA_STORE", raising=False)
    with caplog.at_level(logging.WARNING, logger="vllm.jdlora_ops"):
        assert jdlora_ops_vllm.register() is None
    assert "jdlora_ops cannot be imported" in caplog.text and "plugin not loaded" in caplog.text


def test_entry_point_module_imports_no_jdlora_ops():
    import subprocess

    code = "import sys, jdlora_ops_vllm; print(sorted(m for m in sys.modules if m.split('.')[0] == 'jdlora_ops'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

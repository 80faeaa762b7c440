"""Every script in benchmarks/ still imports: they reach into the library's modules (kernels, tiles, private
launchers), and a refactor that moves a name breaks them long before anyone has a GPU to run them on."""

import importlib
import os
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py"))
# Scripts that refuse to import without Triton's interpreter (they stub its kernels).
NEEDS_INTERPRETER = {"block_host_overhead", "moe_host_overhead"}


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_script_imports(name, monkeypatch):
    if name in NEEDS_INTERPRETER and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("imports only under TRITON_INTERPRET=1")
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import `common` and each other as top-level modules
    module = importlib.import_module(name)
    assert module.__file__ == str(BENCHMARKS / f"{name}.py")
    assert callable(getattr(module, "main", None)) or name == "common", f"{name}.py has no main()"
    sys.modules.pop(name, None)

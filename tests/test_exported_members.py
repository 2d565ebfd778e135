"""Each package's __all__ lists exactly its public names (httpx's test_exported_members)."""

import types

import pytest

import piggyback_core
import server


@pytest.mark.parametrize("package", [piggyback_core, server])
def test_all_lists_every_public_member(package: types.ModuleType) -> None:
    public = {
        name
        for name, value in vars(package).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert set(package.__all__) == public | ({"__version__"} & set(vars(package)))
    assert len(package.__all__) == len(set(package.__all__))


def test_core_never_imports_the_web_layer() -> None:
    import subprocess
    import sys

    code = (
        "import sys, piggyback_core; "
        "print(sorted({'fastapi', 'starlette', 'prometheus_client', 'server'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

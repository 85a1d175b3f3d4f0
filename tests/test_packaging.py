"""The wheel ships what the package promises: examples, the bundled eval text, the licence, one version."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).parent.parent


def test_version_has_one_source() -> None:
    import importlib.metadata

    import mergelab

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert mergelab.__version__ == importlib.metadata.version("mergelab") == declared
    assert f'"{declared}"' not in (ROOT / "src" / "mergelab" / "__init__.py").read_text()  # not written twice


def test_torch_has_no_upper_bound_and_licence_matches() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch_req = next(d for d in project["dependencies"] if d.startswith("torch"))
    assert "<" not in torch_req
    assert "Apache License" in (ROOT / "LICENSE").read_text() and project["license"]["text"] == "Apache-2.0"
    assert project["urls"] and any("License :: OSI Approved :: Apache" in c for c in project["classifiers"])


@pytest.mark.slow
def test_wheel_contains_examples_and_data(tmp_path: Path) -> None:
    pytest.importorskip("setuptools")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("mergelab-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n.removeprefix("mergelab/examples/") for n in names if n.startswith("mergelab/examples/")}
    assert shipped == {p.name for p in (ROOT / "examples").glob("*.yml")} and "search.yml" in shipped
    assert "mergelab/data/eval_text.txt" in names and "mergelab/__main__.py" in names
    assert any(n.endswith("licenses/LICENSE") for n in names)

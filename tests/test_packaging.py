"""Packaging: the wheel holds the packages, the shipped recipes and the console scripts; the CPU path
imports and runs without spconv."""
import os
import subprocess
import sys
import tomllib
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject() -> dict:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_package_list_matches_the_source_tree():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    found = {"sparse_mim.recipes"}
    for top in ("sparse_mim", "fgvc"):
        for dirpath, _, files in os.walk(os.path.join(REPO, top)):
            if "__init__.py" in files:
                found.add(os.path.relpath(dirpath, REPO).replace(os.sep, "."))
    assert listed == found, f"pyproject.toml [tool.setuptools] packages must list exactly: {sorted(found)}"


def test_console_scripts_point_at_library_functions():
    import importlib
    scripts = _pyproject()["project"]["scripts"]
    assert {"spark-pretrain", "spark-export", "spark-visualize", "fgvc-train", "fgvc-eval", "fgvc-predict",
            "fgvc-export"} <= set(scripts)
    for name, target in scripts.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), name


@pytest.mark.slow
def test_wheel_contents(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), REPO], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (wheel,) = [p for p in os.listdir(tmp_path) if p.endswith(".whl")]
    with zipfile.ZipFile(tmp_path / wheel) as z:
        names = set(z.namelist())
        entry_points = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "sparse_mim/recipes/fgvc/demo.yaml" in names
    assert any(n.startswith("sparse_mim/recipes/pretrain/") for n in names)
    assert "sparse_mim/sparse/functional.py" in names and "fgvc/models/metaformer.py" in names
    assert not any(n.startswith(("tests/", "tools/")) for n in names)
    assert "spark-pretrain = sparse_mim.cli:pretrain" in entry_points
    # installed (unpacked wheel, no checkout around it): -c finds the shipped recipes by name
    site = tmp_path / "site"
    with zipfile.ZipFile(tmp_path / wheel) as z:
        z.extractall(site)
    probe = ("from sparse_mim.utils.config import resolve_recipe; import sys; "
             "print(resolve_recipe('fgvc/cub_metaformer0_224')); print(resolve_recipe('pretrain/resnet50.yaml'))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(site)})
    assert out.returncode == 0, out.stderr
    found = out.stdout.split()
    assert found[0].startswith(str(site)) and found[0].endswith("sparse_mim/recipes/fgvc/cub_metaformer0_224.yaml")
    assert os.path.isfile(found[1]) and found[1].startswith(str(site))


_NO_SPCONV = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "spconv" or name.startswith("spconv."):
            raise ModuleNotFoundError("No module named 'spconv' (blocked by the test)")
sys.meta_path.insert(0, Block())
import torch, sparse_mim, fgvc
from sparse_mim.sparse import SparseMap, SparseConv2d
x = torch.randn(2, 4, 64, 64)
visible = torch.rand(2, 2, 2) > 0.3
visible[:, 0, 0] = True
y = SparseConv2d(4, 8, 3, padding=1)(SparseMap.from_dense(x, visible, patch_size=32))
assert y.features.shape[1] == 8
print("ok", "spconv" in sys.modules)
"""


def test_cpu_path_imports_and_runs_without_spconv():
    out = subprocess.run([sys.executable, "-c", _NO_SPCONV], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ok", "False"]

"""Packaging: the wheel holds the packages, the shipped recipes and the console scripts, not the development
tooling (repotools), which the packages never import; the CPU path imports and runs without spconv."""
import ast
import os
import subprocess
import sys
import tomllib
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRODUCT = ("sparse_mim", "fgvc")     # what the wheel installs (with the recipes)
DEV = "repotools"                    # benchmarks, GPU check, fault injection: run from a clone, never installed


def _pyproject() -> dict:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _packages(tops) -> set:
    found = set()
    for top in tops:
        for dirpath, _, files in os.walk(os.path.join(REPO, top)):
            if "__init__.py" in files:
                found.add(os.path.relpath(dirpath, REPO).replace(os.sep, "."))
    return found


def test_package_list_matches_the_source_tree():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    found = _packages(PRODUCT) | {"sparse_mim.recipes"}
    assert listed == found, f"pyproject.toml [tool.setuptools] packages must list exactly: {sorted(found)}"
    dev = _packages([DEV])
    assert DEV in dev and not dev & listed, f"the development package {DEV} must stay out of the wheel"


def _names_dev(source: str, filename: str = "<probe>") -> bool:
    """Whether Python source imports the development package: import / from-import (absolute), or a string
    naming it or one of its modules (``importlib.import_module("...")``, lazy-attribute tables)."""
    names = set()
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value.strip().split(":")[0])
    return any(n == DEV or n.startswith(DEV + ".") for n in names)


def test_product_packages_never_import_the_dev_package():
    """sparse_mim / fgvc must work installed, where repotools does not exist: none of their modules imports it
    (and a helper that both need lives in the product, not in the tooling)."""
    offenders, files = [], 0
    for top in PRODUCT:
        for dirpath, _, names in os.walk(os.path.join(REPO, top)):
            for name in names:
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    files += 1
                    with open(path, encoding="utf-8") as f:
                        if _names_dev(f.read(), path):
                            offenders.append(os.path.relpath(path, REPO))
    assert files > 50  # the walk saw the packages
    assert offenders == [], f"product modules import the development package {DEV}: {offenders}"
    # the check sees each form of import it is meant to catch, and passes what is not one
    for line in (f"import {DEV}", f"from {DEV}.gpu_check import main", f"import os, {DEV}.benchmark_fgvc as b",
                 f"def f():\n    import importlib\n    return importlib.import_module('{DEV}.fault_injection')"):
        assert _names_dev(line), line
    assert not _names_dev("from .benchmark import x\nimport sparse_mim.tools\ns = 'repotools are not installed'")


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
    assert not any(n.startswith(("tests/", "tools/", "docs/", DEV + "/")) for n in names)
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

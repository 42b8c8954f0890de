"""One owner per concept: argument parsing lives in the CLI modules, SparK does not draw pictures, and the
package's layers (utils, the sparse engine, backbones, the rest of sparse_mim, fgvc) import downward only.

Read from the source (every import statement, also those inside functions), so a lazy import
cannot hide a dependency.
"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the modules that parse command lines (and the config system's argv layer they share)
CLI_MODULES = {"fgvc/cli.py", "sparse_mim/cli.py", "sparse_mim/utils/cli.py", "sparse_mim/utils/config.py"}


def _imports(path: str, source: str | None = None) -> set:
    if source is None:
        with open(os.path.join(ROOT, path)) as f:
            source = f.read()
    tree = ast.parse(source, path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names.add(base)
            names.update(f"{base}.{a.name}" if node.module else base + a.name for a in node.names)
    return names


def _package_files():
    for package in ("fgvc", "sparse_mim"):
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    yield os.path.relpath(os.path.join(folder, name), ROOT).replace(os.sep, "/")


def test_only_the_cli_modules_parse_arguments():
    files = sorted(_package_files())
    assert "fgvc/predict.py" in files and "fgvc/export.py" in files
    parsing = {p for p in files if "argparse" in _imports(p)}
    assert "sparse_mim/utils/config.py" in parsing  # the reader finds the imports
    assert parsing <= CLI_MODULES, sorted(parsing - CLI_MODULES)


def test_spark_does_not_import_visualize():
    imports = _imports("sparse_mim/spark.py")
    assert any(name.endswith("utils.misc") for name in imports)  # the reader sees spark's imports
    assert not [name for name in imports if "visualize" in name], imports
    assert any(name in (".spark", ".spark.SparK") for name in _imports("sparse_mim/visualize.py"))


# the package's layers, bottom up: each may import only itself and the layers listed for it
# (imports inside functions count); the sparse engine's own layers are checked in tests/sparse
PACKAGE_LAYERS = {
    "sparse_mim/utils/": ("sparse_mim.utils",),
    "sparse_mim/sparse/": ("sparse_mim.sparse", "sparse_mim.utils"),
    "sparse_mim/backbones/": ("sparse_mim.backbones", "sparse_mim.sparse", "sparse_mim.utils"),
    "sparse_mim/": ("sparse_mim",),
    "fgvc/": ("fgvc", "sparse_mim"),
}


def _absolute(path: str, name: str) -> str:
    """``name`` as found in ``path`` (relative imports resolved against the file's package)."""
    if not name.startswith("."):
        return name
    level = len(name) - len(name.lstrip("."))
    package = path[:-3].split("/")[:-1]
    base = package[:len(package) - (level - 1)]
    rest = name[level:]
    return ".".join(base + ([rest] if rest else []))


def _layer_violations(files, source: str | None = None) -> list:
    bad = []
    for path in files:
        allowed = next(v for k, v in PACKAGE_LAYERS.items() if path.startswith(k))
        for name in _imports(path, source):
            full = _absolute(path, name)
            if full.split(".")[0] in ("sparse_mim", "fgvc", "repotools", "tools", "tests") \
                    and not any(full == a or full.startswith(a + ".") for a in allowed):
                bad.append(f"{path} imports {full}")
    return sorted(set(bad))


def test_package_layers_import_downward_only():
    files = sorted(_package_files())
    assert _layer_violations(files) == []
    # the checker sees an upward import where there is one: utils (the bottom) reaching into the engine
    probe = "sparse_mim/utils/probe.py"
    source = "from .misc import to_pair\n\ndef f():\n    from ..sparse import dispatch\n    from fgvc import train\n"
    assert _layer_violations([probe], source) == [
        f"{probe} imports fgvc", f"{probe} imports fgvc.train",
        f"{probe} imports sparse_mim.sparse", f"{probe} imports sparse_mim.sparse.dispatch"]

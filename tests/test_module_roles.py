"""One owner per concept: argument parsing lives in the CLI modules, SparK does not draw pictures.

Read from the source (every import statement, also those inside functions), so a lazy import
cannot hide a dependency.
"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the modules that parse command lines (and the config system's argv layer they share)
CLI_MODULES = {"fgvc/cli.py", "sparse_mim/cli.py", "sparse_mim/utils/cli.py", "sparse_mim/utils/config.py"}


def _imports(path: str) -> set:
    with open(os.path.join(ROOT, path)) as f:
        tree = ast.parse(f.read(), path)
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

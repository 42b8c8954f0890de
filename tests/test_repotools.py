"""The development tools (repotools, run from a clone through tools/*.py): every documented command line is
accepted by its tool's options, and each shim only hands over to a repotools main."""
import argparse
import ast
import os
import re
import runpy
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md")] + sorted(
    os.path.join(ROOT, "docs", n) for n in os.listdir(os.path.join(ROOT, "docs")) if n.endswith(".md"))


def _shims() -> dict:
    """tools/<name>.py -> the repotools main it calls (read from its import line)."""
    shims = {}
    for name in sorted(os.listdir(os.path.join(ROOT, "tools"))):
        if name.endswith(".py"):
            with open(os.path.join(ROOT, "tools", name)) as f:
                tree = ast.parse(f.read())
            for node in tree.body:
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("repotools."):
                    shims[name] = f"{node.module}:{node.names[0].name}"
    return shims


def test_shims_are_thin():
    """A shim imports sys / os and one repotools main, and runs it: no argparse or logic of its own."""
    shims = _shims()
    assert set(shims) == {"benchmark_sparse_ops.py", "benchmark_pretrain.py", "benchmark_backbone.py",
                          "benchmark_fgvc.py", "sparse_survey.py", "gpu_check.py", "fault_injection.py",
                          "longtail_fgvc.py"}
    for name in shims:
        with open(os.path.join(ROOT, "tools", name)) as f:
            tree = ast.parse(f.read())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert imported == {"os", "sys"}, (name, imported)
        assert not [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))], name


class _Parsed(BaseException):  # not an Exception: the commands turn those into exit codes
    pass


def _documented_commands():
    """(doc, tool, argv) for each `python tools/<shim>.py ...` in README.md and docs/*.md without placeholders."""
    shims = _shims()
    found = []
    for path in DOCS:
        with open(path) as f:
            text = f.read().replace("\\\n", " ")
        for tool, rest in re.findall(r"python (?:\S*/)?tools/(\w+\.py)([^`\n#|]*)", text):
            if tool in shims and not re.search(r"[<\[{]", rest):
                found.append((os.path.basename(path), tool, shlex.split(rest)))
    return found


def test_documented_command_lines_parse(monkeypatch):
    """Each documented command's options are accepted by the tool it names (parsed only: nothing runs)."""
    real = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        raise _Parsed(real(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    monkeypatch.setenv("WANDB_MODE", os.environ.get("WANDB_MODE", "disabled"))  # gpu_check's setdefault
    commands = _documented_commands()
    seen = {tool for _, tool, _ in commands}
    assert {"benchmark_sparse_ops.py", "benchmark_pretrain.py", "benchmark_backbone.py", "benchmark_fgvc.py",
            "sparse_survey.py", "gpu_check.py", "fault_injection.py", "longtail_fgvc.py"} <= seen
    mains = {}
    for doc, tool, argv in commands:
        if tool not in mains:
            mains[tool] = runpy.run_path(os.path.join(ROOT, "tools", tool), run_name="shim")[
                _shims()[tool].split(":")[1]]
        with pytest.raises(_Parsed):
            try:
                mains[tool](argv)
            except SystemExit as e:  # argparse rejected the line
                raise AssertionError(f"{doc}: python tools/{tool} {shlex.join(argv)}: exit {e.code}") from None
    # the check fails on an option a tool does not have
    with pytest.raises(SystemExit):
        mains["benchmark_backbone.py"](["--no-such-option"])

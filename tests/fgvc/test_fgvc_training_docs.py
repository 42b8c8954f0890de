"""The Python examples of docs/fgvc_training.md run as written (in a scratch folder)."""
import os
import re

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "docs",
                   "fgvc_training.md")


def test_training_doc_python_examples_run(tmp_path, monkeypatch, capsys):
    with open(DOC) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for block in blocks:  # one namespace: later blocks use what earlier ones made, as a reader would
        exec(compile(block, DOC, "exec"), namespace)
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) >= 2 and all(float(x) >= 0 for x in printed[-1].split())


def test_training_doc_recipes_and_keys_exist():
    """Every recipe file and config key the page names exists."""
    from fgvc.train import DEFAULTS
    from sparse_mim.utils.config import flatten, shipped_recipes_dir, split_schema
    text = open(DOC).read()
    keys = set(flatten(split_schema(DEFAULTS)[0]))
    named = set(re.findall(r"`((?:model|data|aug|optim|train|log|wandb|checkpoint)\.[a-z_]+)", text))
    assert named and not named - keys, sorted(named - keys)
    root = shipped_recipes_dir()
    for rel in set(re.findall(r"configs/(fgvc/[\w/]+\.yaml)", text)) | set(re.findall(r"-c (fgvc/[\w/]+\.yaml)", text)):
        assert os.path.isfile(os.path.join(root, rel)), rel

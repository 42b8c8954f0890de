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



def _train_commands(text):
    """(line, arguments after the command) of every fgvc-train / train_fgvc.py command line in ``text``."""
    import shlex
    for line in text.replace("\\\n", " ").splitlines():
        line = line.split(" #")[0].strip()
        if not ("fgvc-train" in line or "train_fgvc.py" in line) or line.startswith("#") or "'" in line:
            continue
        args = shlex.split(line)
        at = [i for i, a in enumerate(args) if a == "fgvc-train" or a.endswith("train_fgvc.py")]
        if at:
            yield line, args[at[0] + 1:]


def test_every_training_command_in_the_doc_and_help_parses():
    """Each fgvc-train command of this page and of `fgvc-train --help` resolves to a valid config."""
    from fgvc.cli import TRAIN_DESCRIPTION, _train_argv
    from fgvc.train import DEFAULTS, validate_config
    from sparse_mim.utils.config import parse_config
    with open(DOC) as f:
        bash = "\n".join(re.findall(r"```bash\n(.*?)```", f.read(), flags=re.S))
    commands = list(_train_commands(bash)) + list(_train_commands(TRAIN_DESCRIPTION))
    assert len(commands) >= 10
    for line, args in commands:
        cfg, _ = parse_config(DEFAULTS, _train_argv(args), validate=validate_config)
        assert cfg.model.name, line

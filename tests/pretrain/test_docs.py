"""The examples of docs/pretraining.md run as written (Python blocks; the CLI lines parse)."""
import os
import re
import shlex

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOC = open(os.path.join(ROOT, "docs", "pretraining.md")).read()
PY_BLOCKS = re.findall(r"```python\n(.*?)```", DOC, re.S)
SH_BLOCKS = re.findall(r"```bash\n(.*?)```", DOC, re.S)


def test_model_example_runs():
    exec(compile(PY_BLOCKS[0], "docs/pretraining.md", "exec"), {})


def test_from_checkpoint_example_runs(tmp_path, monkeypatch):
    from sparse_mim.train import DEFAULTS, pretrain, validate_config
    from sparse_mim.utils.config import load_config
    monkeypatch.chdir(tmp_path)  # the example's path is relative: outputs/pretrain_demo/last.pth
    pretrain(load_config(DEFAULTS, None, ["model.backbone_kwargs={depths: [1, 1, 1, 1]}", "model.decoder_width=64",
                                          "data.builtin_images=2", "data.batch_size=2", "train.epochs=1",
                                          "log.progress=false", "log.vis_images=0", "train.amp=off",
                                          "wandb.enabled=false", "checkpoint.export_backbone=false"],
                         validate=validate_config))
    exec(compile(PY_BLOCKS[1], "docs/pretraining.md", "exec"), {})


def test_command_lines_parse():
    """Every `python tools/...` / `spark-*` line names an existing tool and keys the trainer knows."""
    from sparse_mim.train import DEFAULTS, validate_config
    from sparse_mim.utils.config import load_config, split_argv, split_schema, flatten
    keys = flatten(split_schema(DEFAULTS)[0]).keys()
    text = "\n".join(SH_BLOCKS).replace("\\\n", " ")
    checked = 0
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        m = re.search(r"(tools/pretrain\.py|spark-pretrain)(.*)", line)
        if not m:
            continue
        args = shlex.split(m.group(2))
        own, overrides = split_argv(args, keys)
        recipe = own[own.index("-c") + 1] if "-c" in own else None
        overrides = [o for o in overrides if not o.startswith("data.root=")] + ["data.root=/somewhere"]
        load_config(DEFAULTS, recipe and os.path.join(ROOT, "configs", recipe) if recipe and not
                    recipe.startswith("configs/") else recipe and os.path.join(ROOT, recipe), overrides,
                    validate=validate_config)
        checked += 1
    assert checked >= 4
    for tool in re.findall(r"python (tools/\w+\.py)", text):
        assert os.path.isfile(os.path.join(ROOT, tool)), tool

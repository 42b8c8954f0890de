"""Every command that takes a checkpoint names a checkpoint of the other half (or of another model) as such:
what the file is, and which command does take it."""
import io
import contextlib

import pytest
import torch
from PIL import Image

from fgvc import cli as fgvc_cli
from sparse_mim import cli as spark_cli
from sparse_mim.export import export_backbone
from sparse_mim.spark import SparK
from sparse_mim.utils.checkpoint import checkpoint_kind, save_checkpoint
from tests.fgvc.test_predict import save_tiny_checkpoint
from tests.pretrain.test_faults import TINY

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("halves")
    fgvc_best = str(root / "fgvc_best.pth")
    save_tiny_checkpoint(fgvc_best)
    torch.manual_seed(0)
    model = SparK("resnet18", input_size=64, decoder_width=64)
    spark_last = str(root / "spark_last.pth")
    save_checkpoint({"model": model.state_dict(), "spark": model.init_args(), "train_state": {"step": 20},
                     "format": "sparse_mim.pretrain"}, spark_last)
    backbone = str(root / "backbone.pth")
    export_backbone(model, backbone)
    image = str(root / "img.png")
    Image.new("RGB", (64, 64), (90, 20, 200)).save(image)
    return {"fgvc": fgvc_best, "spark": spark_last, "backbone": backbone, "image": image, "root": root}


def _error(fn, argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = fn(argv)
    lines = [ln for ln in err.getvalue().splitlines() if ": error: " in ln]
    assert rc != 0 and len(lines) == 1, err.getvalue()[-2000:]
    return lines[0]


def test_kinds():
    assert checkpoint_kind({"model": {"conv1.weight": torch.zeros(1), "layer1.0.conv1.weight": torch.zeros(1)}})[0] \
        == "backbone"
    assert checkpoint_kind({"module": {"sparse_encoder.sp_cnn.conv1.weight": torch.zeros(1)}})[0] == "spark-weights"
    assert checkpoint_kind({"model": {"cl_1_fc.0.weight": torch.zeros(1)}, "epoch": 3})[0] == "metaformer-weights"
    assert checkpoint_kind({"foo": torch.zeros(1)})[0] == "unknown"


@pytest.mark.parametrize("command", ["resume", "pretrained", "export", "visualize"])
@pytest.mark.parametrize("other", ["fgvc", "backbone"])
def test_spark_commands_name_an_fgvc_or_backbone_file(files, tmp_path, command, other):
    path = files[other]
    if command == "resume":
        line = _error(spark_cli.pretrain, TINY + [f"output_dir={tmp_path}", "data.builtin_images=4",
                                                  "data.batch_size=2", f"resume={path}"])
    elif command == "pretrained":
        line = _error(spark_cli.pretrain, TINY + [f"output_dir={tmp_path}", "data.builtin_images=4",
                                                  "data.batch_size=2", f"model.pretrained={path}"])
    elif command == "export":
        line = _error(spark_cli.export, [path, str(tmp_path / "out.pth")])
    else:
        line = _error(spark_cli.visualize, [path, files["image"], "--out", str(tmp_path / "g.png")])
    what = "an fgvc training checkpoint (metaformer_tiny, 4 classes" if other == "fgvc" else \
        "a backbone-only state dict"
    assert path in line and f"is {what}" in line and "not a SparK pre-training checkpoint" in line
    assert ("fgvc-eval / fgvc-predict / fgvc-export read it" if other == "fgvc" else "model.init_backbone") in line


@pytest.mark.parametrize("command", ["resume", "pretrained", "eval", "predict", "export"])
@pytest.mark.parametrize("other", ["spark", "backbone"])
def test_fgvc_commands_name_a_spark_or_backbone_file(files, tmp_path, command, other):
    path = files[other]
    demo = ["-c", "fgvc/demo.yaml", "train.epochs=1", "log.progress=false", "wandb.enabled=false",
            f"output_dir={tmp_path / 'run'}", "data.num_workers=0"]
    if command == "resume":
        line = _error(fgvc_cli.train, demo + [f"resume={path}"])
    elif command == "pretrained":
        line = _error(fgvc_cli.train, demo + [f"model.pretrained={path}"])
    elif command == "eval":
        line = _error(fgvc_cli.evaluate, [path])
    elif command == "predict":
        line = _error(fgvc_cli.predict, [path, files["image"]])
    else:
        line = _error(fgvc_cli.export, [path, "--out", str(tmp_path / "m.pt2")])
    what = "a SparK pre-training checkpoint (backbone resnet18, step 20)" if other == "spark" else \
        "a backbone-only state dict"
    assert path in line and f"is {what}" in line and ", not " in line
    assert ("spark-pretrain resume=PATH continues it" if other == "spark" else "model.init_backbone") in line


def test_init_backbone_of_another_model_says_what_the_file_is(files, tmp_path):
    line = _error(fgvc_cli.train, ["-c", "fgvc/demo.yaml", "model.name=metaformer_resnet50", "train.epochs=1",
                                   "log.progress=false", "wandb.enabled=false", f"output_dir={tmp_path / 'run'}",
                                   f"model.init_backbone={files['spark']}"])
    assert "do not fit the resnet50 trunk" in line and "is a SparK pre-training checkpoint (backbone resnet18" in line
    line = _error(fgvc_cli.train, ["-c", "fgvc/demo.yaml", "model.name=metaformer_resnet50", "train.epochs=1",
                                   "log.progress=false", "wandb.enabled=false", f"output_dir={tmp_path / 'run2'}",
                                   f"model.init_backbone={files['fgvc']}"])
    assert "is an fgvc training checkpoint" in line and "not a backbone-only state dict" in line


def test_fgvc_resume_from_best_pth_says_weights_only(files, tmp_path):
    line = _error(fgvc_cli.train, ["-c", "fgvc/demo.yaml", f"output_dir={tmp_path / 'run'}", "wandb.enabled=false",
                                   f"resume={files['fgvc']}"])
    assert "holds the weights only" in line and "last.pth" in line

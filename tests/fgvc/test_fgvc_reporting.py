"""Honest reporting: what pretrained / init_backbone loaded, heads whose classes differ, the split actually
read, iNat's validation named as such, one epoch numbering, data.root one folder too high."""
import os

import pytest
import torch
import yaml

import fgvc
from fgvc.data import read_cub, read_inat
from fgvc.demo import make_demo_dataset
from fgvc.report import load_pretrained_reported, position
from fgvc.builders import build_model
from fgvc.train import DEFAULTS, train, validate_config
from sparse_mim.utils.config import load_config

from .test_fgvc_data import _inat_ann, _make_cub
from .test_fgvc_longtail import cub_cfg, make_longtail_cub

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny(n=4):
    return fgvc.create_model("metaformer_tiny", num_classes=n, img_size=32)


def test_pretrained_head_kept_only_for_the_same_classes(tmp_path):
    torch.manual_seed(1)
    src = _tiny()
    path = str(tmp_path / "src.pth")
    classes = ["a", "b", "c", "d"]
    torch.save({"model": src.state_dict(), "classes": classes}, path)
    same = _tiny()
    lines = load_pretrained_reported(same, path, classes)
    assert lines[0] == f"{path}: loaded {len(src.state_dict())} of the model's {len(src.state_dict())} tensors"
    assert "kept the file's head" in lines[-1] and torch.equal(same.head.weight, src.head.weight)
    swapped = _tiny()
    lines = load_pretrained_reported(swapped, path, ["a", "c", "b", "d"])
    assert "re-initialised the head" in lines[-1] and "2 of 4 differ" in lines[-1]
    assert "class 1 is 'b' in the file, 'c' in the data" in lines[-1]
    assert not torch.equal(swapped.head.weight, src.head.weight)
    assert torch.equal(swapped.stage_3[0].attn.qkv.weight, src.stage_3[0].attn.qkv.weight)
    torch.save({"model": src.state_dict()}, path)             # an official-style file: no class list
    lines = load_pretrained_reported(_tiny(), path, classes)
    assert "no class list" in lines[-1] and "same order" in lines[-1]
    lines = load_pretrained_reported(_tiny(6), path, classes + ["e", "f"])
    assert "freshly initialised: head" in lines[0] and any("dropped head.*" in x for x in lines)


def test_init_backbone_load_is_reported(tmp_path):
    cfg = load_config(DEFAULTS, None, ["model.name=metaformer_resnet18", "model.img_size=32"])
    import timm
    full = timm.create_model("resnet18", pretrained=False, num_classes=0)
    path = str(tmp_path / "r18.pth")
    torch.save(full.state_dict(), path)
    cfg.model.init_backbone = path
    lines = []
    build_model(cfg.model, 3, [], log=lines.append)
    n = len(fgvc.create_model("metaformer_resnet18", num_classes=3, img_size=32).backbone.state_dict())
    assert lines[0] == f"[init] model.init_backbone={path}: loaded {n} tensors into the resnet18 trunk"
    assert "not used" in lines[1] and "layer4" in lines[1]


def test_training_from_a_checkpoint_with_other_class_names_says_so(tmp_path):
    """CUB layout: fine-tune from a run whose classes have other names; the head is re-made and the log says so."""
    root = make_longtail_cub(str(tmp_path / "CUB_200_2011"), [6, 6, 6], test_per_class=2)
    base = ["train.epochs=1", "data.batch_size=6", "data.val_split=0"]
    a = str(tmp_path / "a")
    train(cub_cfg(root, a, *base), log=lambda *x: None)
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("1 001.Bird_1\n2 003.Bird_3\n3 002.Bird_2\n")
    lines = []
    train(cub_cfg(root, str(tmp_path / "b"), *base, f"model.pretrained={a}/best.pth"), log=lines.append)
    init = [x for x in lines if x.startswith("[init] model.pretrained:")]
    assert "loaded" in init[0] and "re-initialised the head" in init[-1] and "'002.Bird_2' in the file" in init[-1]


def test_inat2021_train_mini_fallback_recorded_and_val_named(tmp_path):
    root = str(tmp_path / "inat21")
    imgs = [{"id": i, "file_name": f"train_mini/{c:05d}_s/{i}.jpg", "cat": c, "date": "2012-06-01",
             "latitude": 10.0, "longitude": 20.0} for i, c in enumerate([0, 1] * 8)]
    _inat_ann(root, "train_mini", 2021, imgs, cats=(0, 1))
    val = [{"id": 100 + i, "file_name": f"val/{c:05d}_s/{i}.jpg", "cat": c, "date": "2012-06-01",
            "latitude": 10.0, "longitude": 20.0} for i, c in enumerate([0, 1] * 2)]
    _inat_ann(root, "val", 2021, val, cats=(0, 1))
    out = str(tmp_path / "run")
    lines = []
    final = train(load_config(DEFAULTS, "fgvc/tiny_cpu.yaml", [
        "data.dataset=inat2021", f"data.root={root}", f"output_dir={out}", "model.img_size=32", "train.epochs=1",
        "train.warmup_epochs=0", "data.batch_size=8", "data.val_split=0", "log.progress=false",
        "wandb.enabled=false"], validate=validate_config), log=lines.append)
    with open(os.path.join(out, "config.yaml")) as f:
        assert yaml.safe_load(f)["data"]["train_split"] == "train_mini"
    assert final["test_split"].startswith("inat2021/val: validation set (val.json")
    assert "validation set (val.json" in [x for x in lines if x.startswith("[final]")][0]
    from fgvc.evaluate import evaluate_checkpoint
    s = evaluate_checkpoint(os.path.join(out, "best.pth"), overrides=["wandb.enabled=false"], log=lambda *a: None)
    assert s["split_label"].startswith("validation set")
    with pytest.raises(FileNotFoundError, match=f"data.root={root}"):
        read_inat(str(tmp_path), 2021, "train")                       # one folder too high


def test_cub_parent_folder_points_to_the_dataset(tmp_path):
    _make_cub(str(tmp_path / "CUB_200_2011"))
    with pytest.raises(FileNotFoundError, match=f"set data.root={tmp_path / 'CUB_200_2011'}"):
        read_cub(str(tmp_path), "train")


def test_stop_and_resume_messages_number_the_epoch_alike(tmp_path):
    root = str(tmp_path / "data")
    make_demo_dataset(root, n_looks=2, train_per_class=8, test_per_class=4, image_size=32, seed=1)
    args = [f"data.root={root}", f"output_dir={tmp_path / 'run'}", "data.val_split=0", "data.batch_size=8",
            "log.progress=false", "wandb.enabled=false", "train.warmup_epochs=0", "train.epochs=2"]
    stop, resume = [], []
    train(load_config(DEFAULTS, "fgvc/demo.yaml", args + ["train.stop_at_step=3"], validate=validate_config),
          log=stop.append)
    train(load_config(DEFAULTS, "fgvc/demo.yaml", args + ["resume=auto"], validate=validate_config),
          log=resume.append)
    where = "in epoch 1/2, 3 of 4 batches done"
    assert where in [x for x in stop if x.startswith("[stop]")][0]
    assert where in [x for x in resume if x.startswith("[resume]") and "step 3" in x][0]
    assert position(2, 0, 5, 7) == "after epoch 2/5" and position(0, 0, 5, 7) == "at the start"

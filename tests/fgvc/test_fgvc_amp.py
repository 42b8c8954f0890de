"""fgvc under ``train.amp``: the demo reaches the same accuracy in bf16 as in fp32, evaluation in bf16
gives the same top-1 (and the same predictions) as fp32, and the NaN guard stops every mode."""
import csv
import os

import pytest
import torch

from fgvc.demo import make_demo_dataset
from fgvc.finetune_loop import train_one_epoch
from sparse_mim.utils.streams import RandomStreams
from sparse_mim.utils.training_run import TrainState
from fgvc.evaluate import evaluate_checkpoint
from fgvc.train import DEFAULTS, train, validate_config
from sparse_mim.utils.amp import resolve_amp
from sparse_mim.utils.config import load_config, shipped_recipes_dir
from sparse_mim.utils.misc import NonFiniteLossError

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.precision]

DEMO_YAML = os.path.join(shipped_recipes_dir(), "fgvc", "demo.yaml")
QUIET = dict(log=lambda *a: None)


def _cfg(root, out, *overrides):
    return load_config(DEFAULTS, DEMO_YAML, [
        f"data.root={root}", f"output_dir={out}", "data.val_split=0", "data.batch_size=16", "optim.lr_base_batch=16",
        "log.progress=false", "wandb.enabled=false", "train.warmup_epochs=0", "train.epochs=6",
        "train.meta_dropout=false", *overrides], validate=validate_config)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("fgvc_amp_demo") / "data")
    make_demo_dataset(root, n_looks=2, train_per_class=32, test_per_class=16, image_size=32, seed=1)
    out = {}
    for amp in ("off", "bf16"):
        d = str(tmp_path_factory.mktemp(f"run_{amp}"))
        out[amp] = (d, train(_cfg(root, d, f"train.amp={amp}"), **QUIET))
    return out


def test_demo_same_accuracy_in_bf16(runs):
    """Class pairs separable only through the meta tokens: both precisions learn them (measured 100% / 100%)."""
    fp32, bf16 = runs["off"][1], runs["bf16"][1]
    assert fp32["test/top1"] >= 90.0
    assert bf16["test/top1"] >= fp32["test/top1"] - 2.0          # 64 test images: 2% is one image and a bit
    assert bf16["test/top1_meta_zeroed"] == pytest.approx(fp32["test/top1_meta_zeroed"], abs=10.0)
    ck = torch.load(os.path.join(runs["bf16"][0], "last.pth"), weights_only=True, map_location="cpu")
    weights = ck["model"] if "model" in ck else ck
    assert all(v.dtype == torch.float32 for v in weights.values() if torch.is_tensor(v) and v.is_floating_point())


def test_eval_bf16_same_top1_and_predictions(runs, tmp_path):
    """The fp32-trained checkpoint evaluated under bf16 and fp32: same top-1 in every meta condition, same
    predicted class for every image."""
    ckpt = os.path.join(runs["off"][0], "best.pth")
    res, preds = {}, {}
    for amp in ("off", "bf16"):
        d = str(tmp_path / amp)
        res[amp] = evaluate_checkpoint(ckpt, overrides=[f"eval.out_dir={d}", "wandb.enabled=false", "eval.table_rows=0",
                                                        "log.progress=false", f"train.amp={amp}"], **QUIET)["results"]
        with open(os.path.join(d, "predictions.csv")) as f:
            preds[amp] = [(r["path"], r["pred_1"]) for r in csv.DictReader(f)]
    assert {k: v["top1"] for k, v in res["bf16"].items()} == {k: v["top1"] for k, v in res["off"].items()}
    assert preds["bf16"] == preds["off"]


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_nan_guard_every_mode(amp):
    """A NaN loss stops the epoch with a clear error (naming resume=auto) in every precision, weights untouched."""
    class NaNModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, images, meta=None, meta_present=None):
            return self.w * torch.full((images.shape[0], 2), float("nan"))

    batch = {"images": torch.zeros(2, 3, 4, 4), "meta": torch.zeros(2, 1), "meta_present": torch.ones(2, 1).bool(),
             "labels": torch.zeros(2, dtype=torch.long), "index": torch.arange(2), "skipped": 0}
    model = NaNModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    policy = resolve_amp(amp, "cpu")
    with pytest.raises(NonFiniteLossError, match="resume=auto"):
        train_one_epoch(model, [batch], opt, lambda s: 0.1, TrainState(epoch=0), criterion=torch.nn.CrossEntropyLoss(),
                        epochs=1, streams=RandomStreams(0), meta_drop_p=0.0, amp=policy, scaler=policy.make_scaler())
    assert torch.equal(model.w.detach(), torch.ones(1))

"""SyncBatchNorm conversion of every family the engine runs, sparse and dense-masked.

Multi-GPU pre-training converts every BatchNorm (``train.sync_bn``). For each verified family
(the registry of tests/backbones/test_backbone_families.py) both twins are converted and must
keep: no unsynchronised BatchNorm left, the same Parameter / buffer objects, the sparse or
dense-masked behaviour (a twin class), and the same outputs and running statistics (eval and,
without a process group, train mode: torch's SyncBatchNorm then computes local statistics).
The synchronised statistics themselves need a CUDA process group: tools/gpu_check.sh, section ddp.
"""
import copy
import pickle

import pytest
import torch
from torch import nn

import sparse_mim
from sparse_mim.sparse import UnsupportedLayerError, convert_sync_batchnorm
from sparse_mim.sparse.convert import _MaskedBatchNormMixin
from sparse_mim.sparse.nn import _SparseBatchNormMixin
from sparse_mim.testing import random_visible_mask, randomize_weights_
from tests.backbones.test_backbone_families import FAMILIES

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tensors(model):
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _outputs(model, images, visible, train):
    model.train(train)
    with torch.no_grad():
        return [o.clone() for o in model(images, visible)]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_batchnorm_of_every_family_converts(name):
    from sparse_mim.sparse import autotune
    previous = autotune.set_mode("table")
    try:
        sparse = sparse_mim.create_backbone(name, sparse=True, drop_path_rate=0.0, **FAMILIES[name])
        randomize_weights_(sparse, torch.Generator().manual_seed(1))
        sparse.double()
        dense = sparse_mim.create_backbone(name, sparse=False, drop_path_rate=0.0, **FAMILIES[name]).double()
        dense.load_state_dict(sparse.state_dict())
        images = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        visible = random_visible_mask(2, 2, 2, 0.5, torch.Generator().manual_seed(3))
        for model, mixin in ((sparse, _SparseBatchNormMixin), (dense, _MaskedBatchNormMixin)):
            n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
            before = _tensors(model)
            synced = copy.deepcopy(model)
            ref = {train: _outputs(copy.deepcopy(model), images, visible, train) for train in (False, True)}
            trained_ref = copy.deepcopy(model)
            _outputs(trained_ref, images, visible, True)
            keep = _tensors(synced)
            assert convert_sync_batchnorm(synced) is synced
            bns = [m for m in synced.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            assert len(bns) == n_bn
            assert all(isinstance(m, nn.SyncBatchNorm) and isinstance(m, mixin) for m in bns), \
                [type(m).__name__ for m in bns if not (isinstance(m, nn.SyncBatchNorm) and isinstance(m, mixin))]
            after = _tensors(synced)
            assert after.keys() == before.keys() and all(after[k] is keep[k] for k in keep)
            for train in (False, True):
                out = _outputs(synced, images, visible, train)
                assert all(torch.equal(a, b) for a, b in zip(out, ref[train])), f"{name} train={train}"
            # running statistics after the train-mode pass: updated exactly as before the conversion
            stats = {k: v for k, v in trained_ref.state_dict().items() if "running" in k or "num_batches" in k}
            synced_stats = synced.state_dict()
            assert all(torch.equal(v, synced_stats[k]) for k, v in stats.items())
    finally:
        autotune.set_mode(previous)


def test_timm_batchnorm_act_plain_model_and_pickling():
    """Outside the engine a BatchNormAct2d becomes timm's own SyncBatchNormAct; converted models deep-copy."""
    from timm.layers.norm_act import BatchNormAct2d, SyncBatchNormAct
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), BatchNormAct2d(4, act_layer=nn.SiLU)).eval()
    x = torch.randn(2, 3, 8, 8)
    ref = model(x)
    convert_sync_batchnorm(model)
    assert type(model[1]) is SyncBatchNormAct and isinstance(model[1].act, nn.SiLU)
    assert torch.equal(model(x), ref)
    sparse = convert_sync_batchnorm(sparse_mim.create_backbone("efficientnet_b0", sparse=True, drop_path_rate=0.0))
    names = [type(m).__name__ for m in sparse.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert "SparseSyncBatchNormAct" in names
    clone = pickle.loads(pickle.dumps(sparse))  # checkpoints of whole modules, DDP spawn, deepcopy
    assert [type(m).__name__ for m in clone.modules() if isinstance(m, nn.SyncBatchNorm)] == names


class _OwnForwardBN(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


class _PlainSubclassBN(nn.BatchNorm2d):
    pass


def test_unknown_batchnorm_subclasses():
    """A subclass that keeps torch's forward converts; one with its own forward is refused with the layer's name."""
    ok = convert_sync_batchnorm(nn.Sequential(_PlainSubclassBN(3)))
    assert type(ok[0]) is nn.SyncBatchNorm
    with pytest.raises(UnsupportedLayerError, match=r"0: cannot convert .*_OwnForwardBN.*train.sync_bn=false"):
        convert_sync_batchnorm(nn.Sequential(_OwnForwardBN(3)))

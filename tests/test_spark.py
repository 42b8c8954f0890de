"""SparK model: masking, densify + decoder + loss, sparse == dense-masked reference, checkpoints, visualisation.

Small CPU shapes (64x64 and 64x96 inputs, batch 2-3, decoder width 128).
The sparse-vs-dense equivalence uses the real registry backbones (ResNet-18 and
ConvNeXt-V2-atto); the rest uses a tiny local backbone so each test is fast.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from sparse_mim.decoder import LightDecoder
from sparse_mim.spark import SparK, load_spark_checkpoint, param_groups, patchify, unpatchify
from sparse_mim.sparse.tensor import SparseMap, upsample_mask
from sparse_mim.visualize import make_grid_rows, save_grid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TinyBackbone(nn.Module):
    """A 4-scale custom convnet with SparK's dense-masked semantics (conv -> mask, BN over visible sites).

    ``sparse=True`` returns its maps as ``SparseMap``s (the sparse-backbone output
    type), so the two densify paths (SparseMap rows vs gathered dense rows) are compared.
    """

    def __init__(self, widths=(8, 16, 24, 32), sparse: bool = False):
        super().__init__()
        self.channels = list(widths)
        self.downsample_ratio = 32
        self.sparse = sparse
        self.stem = nn.Conv2d(3, widths[0], kernel_size=4, stride=4)
        self.downs = nn.ModuleList([nn.Conv2d(a, b, 2, 2) for a, b in zip(widths[:-1], widths[1:])])
        self.norms = nn.ModuleList([nn.BatchNorm1d(w) for w in widths])

    def _masked_bn(self, x, visible, norm):
        m = upsample_mask(visible, x.shape[-1] // visible.shape[-1])
        rows = norm(x.permute(0, 2, 3, 1)[m])
        return SparseMap(rows, m).dense()

    def forward(self, images, visible, return_sparse: bool = False):
        x = images * upsample_mask(visible, 32)[:, None]
        feats = []
        for i in range(4):
            x = self.stem(x) if i == 0 else self.downs[i - 1](x)
            x = torch.relu(self._masked_bn(x, visible, self.norms[i]))
            feats.append(x)
        if return_sparse:
            return [SparseMap.from_dense(f, visible) for f in feats]
        return feats


def tiny_spark(sparse=False, input_size=64, **kw):
    kw.setdefault("decoder_width", 64)
    return SparK(TinyBackbone(sparse=sparse), input_size=input_size, **kw)


# ---------------------------------------------------------------------------- masking
def test_mask_keeps_exact_count_and_is_deterministic():
    model = tiny_spark(input_size=(128, 96), mask_ratio=0.6)
    assert model.patch_grid == (4, 3) and model.num_visible == round(12 * 0.4)
    masks = model.mask(7, "cpu", generator=torch.Generator().manual_seed(3))
    assert masks.shape == (7, 4, 3) and masks.dtype == torch.bool
    assert masks.flatten(1).sum(1).tolist() == [model.num_visible] * 7
    again = model.mask(7, "cpu", generator=torch.Generator().manual_seed(3))
    other = model.mask(7, "cpu", generator=torch.Generator().manual_seed(4))
    assert torch.equal(masks, again) and not torch.equal(masks, other)
    # 224: 20 of 49 patches visible, as in the paper
    assert tiny_spark(input_size=224).num_visible == 20


def test_forward_draws_mask_with_exact_count():
    model = tiny_spark()
    loss, rec, visible = model(torch.randn(3, 3, 64, 64))
    assert visible.shape == (3, 2, 2) and visible.flatten(1).sum(1).tolist() == [2, 2, 2]
    assert rec.shape == (3, 3, 64, 64) and torch.isfinite(loss)


@pytest.mark.parametrize("size", [100, (64, 80), (48, 64)])
def test_rejects_sizes_not_divisible_by_32(size):
    with pytest.raises(ValueError, match="not divisible by the backbone's downsample ratio 32"):
        tiny_spark(input_size=size)


def test_forward_rejects_bad_images_and_masks():
    model = tiny_spark()
    with pytest.raises(ValueError, match="not divisible"):
        model(torch.randn(1, 3, 64, 70))
    with pytest.raises(ValueError, match="bool"):
        model(torch.randn(1, 3, 64, 64), torch.ones(1, 2, 2))
    with pytest.raises(ValueError, match="no visible patch"):
        model(torch.randn(2, 3, 64, 64), torch.tensor([[[True, False], [False, False]], [[False] * 2] * 2]))
    with pytest.raises(ValueError, match="mask_ratio"):
        tiny_spark(mask_ratio=1.0)


# ---------------------------------------------------------------------------- patches and loss
@pytest.mark.parametrize("hw", [(64, 64), (64, 96)])
def test_patchify_round_trip_and_layout(hw):
    x = torch.randn(2, 3, *hw)
    p = patchify(x, 32)
    grid = (hw[0] // 32, hw[1] // 32)
    assert p.shape == (2, grid[0] * grid[1], 32 * 32 * 3)
    assert torch.equal(unpatchify(p, 32, grid), x)
    # patch (row 0, col 1), pixel (py=5, px=7), channel 2
    assert p[1, 1, (5 * 32 + 7) * 3 + 2] == x[1, 2, 5, 32 + 7]


def test_loss_counts_hidden_patches_only():
    model = tiny_spark().eval()
    images = torch.randn(2, 3, 64, 64)
    visible = torch.tensor([[[True, False], [False, True]], [[False, True], [False, False]]])
    _, rec, _ = model(images, visible)
    loss = model.forward_loss(images, rec, visible)
    # manual: per-patch normalised target, unbiased var
    tgt = patchify(images, 32)
    tgt = (tgt - tgt.mean(-1, keepdim=True)) / (tgt.var(-1, unbiased=True, keepdim=True) + 1e-6).sqrt()
    per_patch = ((patchify(rec, 32) - tgt) ** 2).mean(-1)
    hidden = ~visible.flatten(1)
    torch.testing.assert_close(loss, per_patch[hidden].mean())
    px = upsample_mask(visible, 32)[:, None].expand_as(rec)
    noisy_visible = torch.where(px, rec + 5 * torch.randn_like(rec), rec)
    assert torch.equal(model.forward_loss(images, noisy_visible, visible), loss)
    noisy_hidden = torch.where(px, rec, rec + 0.1)
    assert model.forward_loss(images, noisy_hidden, visible) != loss


# ---------------------------------------------------------------------------- structure
def test_decoder_structure_matches_the_paper():
    dec = LightDecoder(32, width=768)
    assert [b.up_sample.in_channels for b in dec.dec] == [768, 384, 192, 96, 48]
    assert [b.conv[3].out_channels for b in dec.dec] == [384, 192, 96, 48, 24]
    blk = dec.dec[0]
    assert (blk.up_sample.kernel_size, blk.up_sample.stride, blk.up_sample.padding) == ((4, 4), (2, 2), (1, 1))
    assert isinstance(blk.conv[2], nn.ReLU6) and isinstance(blk.conv[4], nn.BatchNorm2d)
    assert dec.proj.out_channels == 3 and dec.proj.kernel_size == (1, 1)
    out = LightDecoder(32, width=64)([torch.randn(1, 64, 2, 3)])
    assert out.shape == (1, 3, 64, 96)
    with pytest.raises(ValueError, match="divisible"):
        LightDecoder(32, width=100)
    assert isinstance(LightDecoder(32, width=64, sbn=True).dec[0].conv[1], nn.SyncBatchNorm)


def test_densify_layers_follow_the_official_rule():
    model = tiny_spark(decoder_width=32)  # coarsest encoder width 32 == decoder width -> identity
    assert isinstance(model.densify_projs[0], nn.Identity)
    assert [p.kernel_size for p in model.densify_projs[1:]] == [(3, 3)] * 3
    assert [p.out_channels for p in model.densify_projs[1:]] == [16, 8, 4]
    assert [tuple(t.shape) for t in model.mask_tokens] == [(1, 32, 1, 1), (1, 24, 1, 1), (1, 16, 1, 1), (1, 8, 1, 1)]
    assert all(t.abs().max() <= .02 and t.std() > 0 for t in model.mask_tokens)
    model = tiny_spark(decoder_width=64)
    assert model.densify_projs[0].kernel_size == (1, 1) and model.densify_projs[0].out_channels == 64


def test_densify_fills_hidden_sites_with_mask_tokens():
    model = tiny_spark(densify_norm="identity", decoder_width=32).eval()
    feats = [torch.randn(2, c, 64 // s, 64 // s) for c, s in zip(model.backbone.channels, (4, 8, 16, 32))]
    visible = torch.tensor([[[True, False], [False, False]], [[False, True], [True, True]]])
    dense = model.densify(feats, visible)[0]  # coarsest scale, identity projection
    for b in range(2):
        for y in range(2):
            for x in range(2):
                want = feats[3][b, :, y, x] if visible[b, y, x] else model.mask_tokens[0][0, :, 0, 0]
                assert torch.equal(dense[b, :, y, x], want)


@pytest.mark.parametrize("train", [True, False])
def test_sparsemap_and_dense_densify_paths_agree(train):
    """Same weights; one backbone hands SparseMaps, the other dense maps: same loss and gradients."""
    torch.manual_seed(0)
    a = tiny_spark(sparse=True, input_size=(64, 96)).train(train)
    b = tiny_spark(sparse=False, input_size=(64, 96)).train(train)
    b.load_state_dict(a.state_dict())
    images = torch.randn(2, 3, 64, 96)
    visible = a.mask(2, "cpu", generator=torch.Generator().manual_seed(0))
    la, ra, _ = a(images, visible)
    lb, rb, _ = b(images, visible)
    la.backward(), lb.backward()
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=0)
    torch.testing.assert_close(ra, rb, rtol=1e-5, atol=1e-6)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-7, msg=n)


# ---------------------------------------------------------------------------- optimiser groups
def test_param_groups_exclusions():
    model = tiny_spark()
    groups = param_groups(model, 0.05)
    decay = {id(p) for p in groups[0]["params"]}
    no_decay = {id(p) for p in groups[1]["params"]}
    names = dict(model.named_parameters())
    assert decay.isdisjoint(no_decay) and decay | no_decay == {id(p) for p in names.values()}
    for n, p in names.items():
        expect_no_decay = p.ndim <= 1 or n.endswith("bias") or n.startswith("mask_tokens")
        assert (id(p) in no_decay) == expect_no_decay, n
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    gamma_model = nn.Module()
    gamma_model.gamma = nn.Parameter(torch.ones(4, 1))  # layer scale, even if not 1-D
    gamma_model.weight = nn.Parameter(torch.ones(4, 4))
    g = param_groups(gamma_model, 0.1)
    assert [len(g[0]["params"]), len(g[1]["params"])] == [1, 1] and g[1]["params"][0] is gamma_model.gamma


# ---------------------------------------------------------------------------- visualisation
def test_reconstruction_pastes_visible_patches_and_grid_shapes(tmp_path):
    model = tiny_spark().eval()
    images = torch.randn(3, 3, 64, 64)
    visible = model.mask(3, "cpu", generator=torch.Generator().manual_seed(1))
    views = model.reconstruct(images, visible)
    px = upsample_mask(visible, 32)[:, None].expand_as(images)
    assert torch.equal(views["reconstruction"][px], images[px])
    assert torch.equal(views["masked"][~px], torch.zeros_like(images[~px]))
    # hidden pixels: the prediction un-normalised with each patch's own mean / std
    _, pred, _ = model(images, visible)
    tgt = patchify(images, 32)
    mean, std = tgt.mean(-1, keepdim=True), (tgt.var(-1, keepdim=True) + 1e-6).sqrt()
    expect = unpatchify(patchify(pred, 32) * std + mean, 32, (2, 2))
    torch.testing.assert_close(views["reconstruction"][~px], expect[~px])

    grid = model.reconstruction_grid(images, visible, padding=2)
    assert grid.shape == (3, 3 * (64 + 2) + 2, 3 * (64 + 2) + 2)
    assert grid.min() >= 0 and grid.max() <= 1
    path = tmp_path / "grid.png"
    save_grid(grid, path)
    from PIL import Image
    with Image.open(path) as im:
        assert im.size == (grid.shape[2], grid.shape[1]) and im.mode == "RGB"
    # the original column of row 1 is the de-normalised image 1
    from sparse_mim.visualize import denormalize
    torch.testing.assert_close(grid[:, 2 + 66:2 + 66 + 64, 2 + 2 * 66:2 + 2 * 66 + 64], denormalize(images)[1])
    with pytest.raises(ValueError, match="same shape"):
        make_grid_rows([images, images[:, :, :32]])

"""SparK model: masking, densify + decoder + loss, sparse == dense-masked reference, checkpoints, visualisation.

Small CPU shapes (64x64 and 64x96 inputs, batch 2-3, decoder width 128).
The sparse-vs-dense equivalence uses the real registry backbones (ResNet-18 and
ConvNeXt-V2-atto); the rest uses a tiny local backbone so each test is fast.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from sparse_mim.decoder import LightDecoder
from sparse_mim.spark import SparK, load_spark_checkpoint, param_groups, patchify, unpatchify
from sparse_mim.sparse.tensor import SparseMap, upsample_mask
from sparse_mim.visualize import make_grid_rows, reconstruction_grid, save_grid

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))



pytestmark = pytest.mark.usefixtures("one_torch_thread")

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

    grid = reconstruction_grid(model, images, visible, padding=2)
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


# ---------------------------------------------------------------------------- checkpoints
def _official_decoder_and_densify_keys(norm: str, identity_first_proj: bool) -> set[str]:
    """Key names of the official SparK module outside the encoder, written out from its structure."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = set()
    for i in range(4):
        keys.add(f"mask_tokens.{i}")
        keys |= {f"densify_norms.{i}.{k}" for k in (bn if norm == "bn" else ("weight", "bias"))}
        if not (i == 0 and identity_first_proj):
            keys |= {f"densify_projs.{i}.weight", f"densify_projs.{i}.bias"}
    for b in range(5):
        keys |= {f"dense_decoder.dec.{b}.up_sample.weight", f"dense_decoder.dec.{b}.up_sample.bias",
                 f"dense_decoder.dec.{b}.conv.0.weight", f"dense_decoder.dec.{b}.conv.3.weight"}
        keys |= {f"dense_decoder.dec.{b}.conv.{j}.{k}" for j in (1, 4) for k in bn}
    return keys | {"dense_decoder.proj.weight", "dense_decoder.proj.bias"}


def _timm_to_official_convnext(key: str) -> str | None:
    """timm ConvNeXt names -> the official (facebookresearch / SparK) ones; None for the head."""
    import re
    if key.startswith("head."):
        return None
    key = re.sub(r"^stem\.(\d)", r"downsample_layers.0.\1", key)
    key = re.sub(r"^stages\.(\d)\.downsample\.(\d)", r"downsample_layers.\1.\2", key)
    key = re.sub(r"^stages\.(\d)\.blocks\.(\d+)", r"stages.\1.\2", key)
    return key.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv")


@pytest.mark.parametrize("name,norm", [("resnet18", "bn"), ("convnext_atto", "ln")])
def test_loads_official_withdecoder_file(tmp_path, name, norm):
    model = SparK(name, input_size=64, decoder_width=320 if name == "convnext_atto" else 256)
    assert model.densify_norm_type == norm
    identity = name == "convnext_atto"  # coarsest width 320 == decoder width -> identity projection
    assert isinstance(model.densify_projs[0], nn.Identity) == identity
    ours = model.state_dict()
    enc = "sparse_encoder.sp_cnn."
    assert {k for k in ours if not k.startswith(enc)} == _official_decoder_and_densify_keys(norm, identity)

    official = {}
    for k, v in ours.items():
        if k.startswith(enc):
            sub = k[len(enc):] if name == "resnet18" else _timm_to_official_convnext(k[len(enc):])
            if sub is None:
                continue
            k = enc + sub
        official[k] = torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v + 3
    official |= {"imn_m": torch.zeros(1, 3, 1, 1), "imn_s": torch.ones(1, 3, 1, 1),
                 "norm_black": torch.zeros(1, 3, 64, 64),
                 "config": {"mask_ratio": 0.6, "densify_norm_str": norm, "sbn": False, "hierarchy": 4,
                            "sparse_encoder.input_size": 64, "dense_decoder.width": model.dense_decoder.width}}
    path = tmp_path / "official_withdecoder_1kpretrained_spark_style.pth"
    torch.save({"module": official, "arch": name, "input_size": 64, "epoch": 3, "is_pretrain": True}, path)

    fresh = SparK(name, input_size=64, decoder_width=model.dense_decoder.width)
    report = load_spark_checkpoint(fresh, path)
    assert sorted(report["ignored_keys"]) == ["imn_m", "imn_s", "norm_black"]
    rebuilt = SparK.from_checkpoint(path)  # the official file describes its model too (arch, input size, config)
    assert (rebuilt.backbone_name, rebuilt.input_size, rebuilt.dense_decoder.width, rebuilt.densify_norm_type) == \
        (name, (64, 64), model.dense_decoder.width, norm)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in rebuilt.state_dict().items())
    assert report["config"]["densify_norm_str"] == norm
    loaded = fresh.state_dict()
    for k, v in ours.items():
        sub = k[len(enc):] if k.startswith(enc) else None
        if sub is not None and name == "convnext_atto":
            official_key = _timm_to_official_convnext(sub)
            if official_key is None:
                assert torch.equal(loaded[k], v)  # unused head kept as it was
                continue
            src = official[enc + official_key]
        else:
            src = official[k]
        assert torch.equal(loaded[k], src.reshape(loaded[k].shape)), k
    # our own training checkpoints: {'model': state_dict, 'config': ...}, also behind DDP's 'module.' prefix
    again = SparK(name, input_size=64, decoder_width=model.dense_decoder.width)
    load_spark_checkpoint(again, {"model": {"module." + k: v for k, v in loaded.items()}, "config": {}})
    assert all(torch.equal(v, loaded[k]) for k, v in again.state_dict().items())


def test_checkpoint_of_another_architecture_errors_clearly(tmp_path):
    r18 = SparK("resnet18", input_size=64, decoder_width=256)
    path = tmp_path / "r18.pth"
    torch.save({"model": r18.state_dict(), "config": {"model": {"backbone": "resnet18"}}}, path)
    with pytest.raises(ValueError, match=r"(?s)does not fit.*Missing keys.*Unexpected keys") as e:
        load_spark_checkpoint(SparK("convnext_atto", input_size=64, decoder_width=256), path)
    assert "backbone convnext_atto" in str(e.value) and "'backbone': 'resnet18'" in str(e.value)
    assert "sparse_encoder.sp_cnn.stages.0.blocks.0.conv_dw.weight" in str(e.value)
    with pytest.raises(ValueError, match=r"(?s)Shape mismatches.*dense_decoder.dec.0.up_sample.weight"):
        load_spark_checkpoint(SparK("resnet18", input_size=64, decoder_width=128), path)
    with pytest.raises(ValueError, match="Missing keys.*layer1.2"):
        load_spark_checkpoint(SparK("resnet34", input_size=64, decoder_width=256), path)
    backbone_only = tmp_path / "resnet18_1kpretrained_timm_style.pth"
    torch.save(r18.backbone.state_dict(), backbone_only)
    with pytest.raises(ValueError, match="backbone-only file"):
        load_spark_checkpoint(r18, backbone_only)


def _spark_checkpoint(tmp_path, model, **extra):
    path = tmp_path / "last.pth"
    torch.save({"model": model.state_dict(), "spark": model.init_args(), **extra}, path)
    return path


def _image_folder(tmp_path):
    from PIL import Image
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, wh in enumerate([(80, 70), (64, 64)]):
        Image.fromarray((torch.rand(wh[1], wh[0], 3) * 255).byte().numpy()).save(folder / f"{i}.png")
    return folder


def test_from_checkpoint_rebuilds_the_model_it_describes(tmp_path):
    model = SparK("resnet18", input_size=(64, 96), mask_ratio=0.5, decoder_width=64, depths=[1, 1, 1, 1])
    path = _spark_checkpoint(tmp_path, model, config={"unrelated": {"input_size": 999}})
    again = SparK.from_checkpoint(path)
    assert again.input_size == (64, 96) and again.mask_ratio == 0.5 and again.dense_decoder.width == 64
    assert again.backbone_kwargs["depths"] == [1, 1, 1, 1] and again.is_sparse
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in again.state_dict().items())
    assert not SparK.from_checkpoint(path, sparse=False).is_sparse


def test_visualize_checkpoint(tmp_path):
    from PIL import Image
    from sparse_mim import cli
    from sparse_mim.visualize import visualize_checkpoint
    model = SparK("resnet18", input_size=64, decoder_width=64)
    ckpt = _spark_checkpoint(tmp_path, model)
    folder = _image_folder(tmp_path)
    out = tmp_path / "grid.png"
    report = visualize_checkpoint(ckpt, [str(folder)], out, seed=1)
    assert report["images"] == 2 and report["input_size"] == [64, 64] and report["backbone"] == "resnet18"
    with Image.open(out) as im:
        assert im.size == (3 * 66 + 2, 2 * 66 + 2)
    assert oct(os.stat(out).st_mode & 0o777) == "0o644"
    assert cli.visualize([str(ckpt), str(folder), "--out", str(out), "--mask-ratio", "0.75"]) == 0


def test_readers_refuse_non_finite_and_foreign_checkpoints(tmp_path, capsys):
    from sparse_mim import cli
    from sparse_mim.spark import NotASparKCheckpointError
    from sparse_mim.utils.checkpoint import NonFiniteStateError
    model = SparK("resnet18", input_size=64, decoder_width=64)
    model.dense_decoder.dec[0].conv[1].running_var.fill_(float("inf"))
    ckpt = _spark_checkpoint(tmp_path, model)
    folder = _image_folder(tmp_path)
    with pytest.raises(NonFiniteStateError, match="running_var"):
        SparK.from_checkpoint(ckpt)
    assert cli.visualize([str(ckpt), str(folder), "--out", str(tmp_path / "g.png")]) == 1
    assert cli.export([str(ckpt), str(tmp_path / "bb.pth")]) == 0  # the encoder itself is finite
    model.backbone.conv1.weight.data[0, 0, 0, 0] = float("nan")
    ckpt = _spark_checkpoint(tmp_path, model)
    assert cli.export([str(ckpt), str(tmp_path / "bb.pth")]) == 1
    err = capsys.readouterr().err
    assert "NaN or inf" in err and "conv1.weight" in err
    fgvc_like = tmp_path / "fgvc.pth"
    torch.save({"model": {"head.weight": torch.zeros(2, 2)}, "epoch": 3}, fgvc_like)
    with pytest.raises(NotASparKCheckpointError, match="not a SparK checkpoint"):
        SparK.from_checkpoint(fgvc_like)
    assert cli.visualize([str(fgvc_like), str(folder)]) == 1
    assert "not a SparK checkpoint" in capsys.readouterr().err


def test_official_init_statistics():
    """Official init: last BN of every ResNet block 0, densify projections at PyTorch's default conv init."""
    torch.manual_seed(0)
    official = SparK("resnet50", input_size=64, decoder_width=768)
    torch.manual_seed(0)
    ours = SparK("resnet50", input_size=64, decoder_width=768, init="trunc_normal")
    bn3 = {k: v for k, v in official.backbone.state_dict().items() if k.endswith("bn3.weight")}
    assert len(bn3) == 16 and all(float(v.abs().max()) == 0 for v in bn3.values())
    assert all(float(v.min()) == 1 for k, v in ours.backbone.state_dict().items() if k.endswith("bn3.weight"))
    other_bn = [v for k, v in official.backbone.state_dict().items() if k.endswith(("bn1.weight", "bn2.weight"))]
    assert all(float(v.min()) == 1 for v in other_bn)
    for i, proj in enumerate(official.densify_projs):
        if not isinstance(proj, nn.Conv2d):
            continue
        fan_in = proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]
        bound = 1 / fan_in ** 0.5  # kaiming_uniform(a=sqrt(5)) weight and bias bound
        w, b = proj.weight, proj.bias
        assert float(w.abs().max()) <= bound + 1e-7 and float(b.abs().max()) <= bound + 1e-7
        assert abs(float(w.std()) - bound / 3 ** 0.5) < 0.05 * bound / 3 ** 0.5, i  # uniform(-a, a): std a/sqrt(3)
        assert float(b.abs().max()) > 0.5 * bound  # uniform biases, not zeros
        theirs = ours.densify_projs[i]
        assert abs(float(theirs.weight.std()) - 0.02) < 0.003 and float(theirs.bias.abs().max()) == 0
    # a backbone module passed in is never re-initialised
    from sparse_mim import create_backbone
    given = create_backbone("resnet18")
    with torch.no_grad():
        given.layer1[0].bn2.weight.fill_(0.5)
    assert float(SparK(given, input_size=64, decoder_width=64).backbone.layer1[0].bn2.weight.min()) == 0.5
    # ConvNeXt has no BatchNorm to zero: official and trunc_normal differ in the projections only
    torch.manual_seed(0)
    a = SparK("convnext_atto", input_size=64, decoder_width=64)
    torch.manual_seed(0)
    b = SparK("convnext_atto", input_size=64, decoder_width=64, init="trunc_normal")
    assert all(torch.equal(v, b.backbone.state_dict()[k]) for k, v in a.backbone.state_dict().items())

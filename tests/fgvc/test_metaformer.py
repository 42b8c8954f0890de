"""MetaFormer structure, forward and attention equivalence (CPU, small where it can be)."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fgvc
from fgvc.models import meta_dropout_mask, param_groups_for_weight_decay
from fgvc.models.metaformer import MetaFormer, RelativeAttention

_spec = importlib.util.spec_from_file_location(
    "metaformer_keys", Path(__file__).parent / "fixtures" / "metaformer_keys.py")
official = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(official)

VARIANTS = ["metaformer_0", "metaformer_1", "metaformer_2"]


def _meta_model(name, **kw):
    """Structure only: parameters on the meta device (no memory, no init time)."""
    with torch.device("meta"):
        return fgvc.create_model(name, **kw)


# ---------------------------------------------------------------------------------------------
# Structure: parameter counts and the official key set
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("img_size", [224, 384])
@pytest.mark.parametrize("name", VARIANTS)
def test_param_count_matches_official(name, img_size):
    model = _meta_model(name, num_classes=1000, img_size=img_size)
    n = sum(p.numel() for p in model.parameters())
    expected = official.OFFICIAL_PARAM_COUNTS_M[(name, img_size)]
    assert abs(n / 1e6 - expected) < 0.05, f"{name}@{img_size}: {n / 1e6:.3f}M vs official {expected}M"
    # The independent key list agrees with the published count too.
    assert abs(official.official_param_count(official.official_state_dict_shapes(name, img_size)) / 1e6
               - expected) < 0.05


LAYOUTS = [
    dict(meta_dims=()),                                # image only (official MetaFG)
    dict(meta_dims=(4, 3)),                            # iNaturalist location + time
    dict(meta_dims=(312,)),                            # CUB attributes
    dict(meta_dims=(768,), meta_tokens=(32,)),         # CUB text: 32 BERT tokens
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda d: f"meta{list(d['meta_dims'])}")
@pytest.mark.parametrize("name,img_size", [("metaformer_0", 224), ("metaformer_1", 384), ("metaformer_2", 224)])
def test_state_dict_keys_and_shapes_equal_official(name, img_size, layout):
    model = _meta_model(name, num_classes=200, img_size=img_size, **layout)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = official.official_state_dict_shapes(name, img_size, num_classes=200, meta_dims=layout["meta_dims"],
                                                 meta_tokens=layout.get("meta_tokens"))
    index_keys = {k for k in theirs if k.endswith("relative_position_index")}
    # The official index buffers are persistent; ours are rebuilt from the grid (non-persistent).
    assert set(ours) == set(theirs) - index_keys, (
        f"missing: {sorted(set(theirs) - index_keys - set(ours))[:10]}, extra: {sorted(set(ours) - set(theirs))[:10]}")
    bad = {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]}
    assert not bad, bad
    # Our grid-only index buffers exist, one per attention layer.
    assert sum(1 for k, _ in model.named_buffers() if k.endswith("relative_position_index")) == len(index_keys)


def test_unsupported_sizes_are_rejected():
    with pytest.raises(ValueError, match="multiples of 32"):
        _meta_model("metaformer_0", img_size=200)
    with pytest.raises(ValueError, match="meta_dims"):
        _meta_model("metaformer_0", meta_dims=(4, 0))
    with pytest.raises(ValueError, match="meta_tokens"):
        _meta_model("metaformer_0", meta_dims=(4, 3), meta_tokens=(1,))
    with pytest.raises(ValueError, match="unknown model"):
        fgvc.create_model("metaformer_9")


def test_registry():
    names = fgvc.list_models()
    assert {"metaformer_0", "metaformer_1", "metaformer_2", "metaformer_resnet50",
            "metaformer_convnext_small", "metaformer_resnet18", "metaformer_convnext_atto"} <= set(names)
    assert fgvc.list_models("metaformer_?") == VARIANTS


# ---------------------------------------------------------------------------------------------
# Forward at the official sizes (MetaFormer-0, built once per module)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mf0_224():
    torch.manual_seed(0)
    return fgvc.create_model("metaformer_0", num_classes=10, img_size=224, meta_dims=(4, 3)).eval()


@pytest.fixture(scope="module")
def mf0_384():
    torch.manual_seed(0)
    return fgvc.create_model("metaformer_0", num_classes=10, img_size=384, meta_dims=(4, 3)).eval()


@pytest.mark.parametrize("fixture_name,size", [("mf0_224", 224), ("mf0_384", 384)])
def test_forward_shapes_official_sizes(request, fixture_name, size):
    """Batch 2 at the official sizes: sample 0 with meta, sample 1 without (one forward)."""
    model = request.getfixturevalue(fixture_name)
    images = torch.randn(1, 3, size, size).expand(2, -1, -1, -1)  # same image twice
    meta = torch.randn(2, 7)
    present = torch.tensor([[True, True], [False, False]])
    with torch.inference_mode():
        feats = model.forward_features(images, meta, meta_present=present)
        logits = model.forward_head(feats)
    assert feats.shape == (2, model.num_features) == (2, 768)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert not torch.allclose(logits[0], logits[1])  # the meta tokens reach the logits


def test_wrong_input_size_says_how_to_fix(mf0_224):
    with pytest.raises(ValueError, match="img_size"):
        mf0_224(torch.randn(1, 3, 256, 256))


# ---------------------------------------------------------------------------------------------
# Small models: gradients, meta handling, SDPA vs explicit
# ---------------------------------------------------------------------------------------------

SMALL = 64  # stage-3 grid 4x4, stage-4 grid 2x2
# The MetaFormer structure at a fraction of the width/depth: every block type, fast on CPU.
TINY = dict(conv_embed_dims=(32, 48, 96), attn_embed_dims=(64, 128), conv_depths=(2, 1, 2), attn_depths=(2, 2))


@pytest.mark.parametrize("name", ["metaformer_0", "metaformer_resnet18", "metaformer_convnext_atto"])
def test_every_parameter_gets_a_gradient(name):
    kw = TINY if name == "metaformer_0" else dict(embed_dims=(64, 128), depths=(1, 2))
    model = fgvc.create_model(name, num_classes=5, img_size=SMALL, meta_dims=(4, 3), drop_path_rate=0., **kw)
    model.train()
    logits = model(torch.randn(2, 3, SMALL, SMALL), torch.randn(2, 7))
    assert logits.shape == (2, 5)
    logits.logsumexp(-1).sum().backward()
    # aggregate.bias shifts every channel of the class embedding by one number right before a LayerNorm
    # over those channels, which removes any such shift: its gradient is zero up to rounding by
    # construction (as in the official model), so it only has to be reached, not to be non-zero.
    no_grad = [n for n, p in model.named_parameters()
               if p.grad is None or (n != "aggregate.bias" and not p.grad.abs().sum() > 0)]
    assert not no_grad, no_grad


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = fgvc.create_model("metaformer_0", num_classes=5, img_size=SMALL, meta_dims=(4,), drop_path_rate=0.,
                              **TINY)
    x, meta = torch.randn(2, 3, SMALL, SMALL), torch.randn(2, 4)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        model(x, meta).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.fixture(scope="module")
def small_meta_model():
    torch.manual_seed(1)
    model = fgvc.create_model("metaformer_0", num_classes=7, img_size=SMALL, meta_dims=(4, 3, 6),
                              meta_tokens=(1, 1, 3), drop_path_rate=0., **TINY)
    return model.eval()


def test_meta_inputs_forms_agree(small_meta_model):
    m = small_meta_model
    B = 3
    g = [torch.randn(B, 4), torch.randn(B, 3), torch.randn(B, 3, 6)]

    def tokens(meta, present=None):
        with torch.inference_mode():
            t3, t4 = m.embed_meta(meta, B, present)
        return torch.cat(t3, 1), torch.cat(t4, 1)

    as_list = tokens(g)
    torch.testing.assert_close(tokens(torch.cat([g[0], g[1], g[2].flatten(1)], dim=1)), as_list)
    absent = tokens(None)
    torch.testing.assert_close(tokens([torch.zeros_like(t) for t in g]), absent)
    torch.testing.assert_close(tokens(g, torch.zeros(B, 3, dtype=torch.bool)), absent)
    partial_ref = tokens([g[0], torch.zeros_like(g[1]), g[2]])
    torch.testing.assert_close(tokens(g, torch.tensor([[True, False, True]] * B)), partial_ref)
    torch.testing.assert_close(tokens([g[0], None, g[2]]), partial_ref)
    assert as_list[0].shape == (B, 5, 64) and as_list[1].shape == (B, 5, 128)  # 1 + 1 + 3 tokens

    # Through the whole model: per-sample presence (sample 1 loses all its meta).
    x = torch.randn(B, 3, SMALL, SMALL)
    with torch.inference_mode():
        full = m(x, g)
        mixed = m(x, g, meta_present=torch.tensor([[True] * 3, [False] * 3, [True] * 3]))
        absent_1 = m(x[1:2])
    torch.testing.assert_close(mixed[[0, 2]], full[[0, 2]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1:2], absent_1, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(full[1], mixed[1], atol=1e-4)


def test_bad_meta_says_what_is_wrong(small_meta_model):
    m = small_meta_model
    x = torch.randn(2, 3, SMALL, SMALL)
    with pytest.raises(ValueError, match="features per sample"):
        m(x, torch.randn(2, 9))
    with pytest.raises(ValueError, match="3 groups"):
        m(x, [torch.randn(2, 4)])
    with pytest.raises(ValueError, match="meta group 2"):
        m(x, [torch.randn(2, 4), torch.randn(2, 3), torch.randn(2, 2, 6)])
    with pytest.raises(ValueError, match="meta_present"):
        m(x, None, meta_present=torch.ones(2, 2, dtype=torch.bool))
    image_only = _meta_model("metaformer_0", img_size=SMALL)
    with pytest.raises(ValueError, match="no meta groups"):
        image_only.split_meta(torch.randn(2, 7), 2)


def test_text_like_group_takes_many_tokens():
    """A [B, T, d] embedding (e.g. 32 BERT tokens) gives T tokens through the same heads."""
    torch.manual_seed(0)
    m = fgvc.create_model("metaformer_0", num_classes=3, img_size=SMALL, meta_dims=(16,), meta_tokens=(5,),
                          **TINY).eval()
    text = torch.randn(2, 5, 16)
    tokens_3, tokens_4 = m.embed_meta(text, 2)
    assert tokens_3[0].shape == (2, 5, 64) and tokens_4[0].shape == (2, 5, 128)
    # token t of the group is the head applied to row t
    torch.testing.assert_close(tokens_3[0][:, 2], m.meta_1_head_1(text[:, 2]))
    with torch.inference_mode():
        assert m(torch.randn(2, 3, SMALL, SMALL), text).shape == (2, 3)


def _reference_attention(attn: RelativeAttention, x: torch.Tensor, num_extra: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + B) v with B built by the official zero-padded index."""
    h, w = attn.grid_size
    coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).clone()
    rel[:, :, 0] += h - 1
    rel[:, :, 1] += w - 1
    rel[:, :, 0] *= 2 * w - 1
    index = F.pad(rel.sum(-1), (num_extra, 0, num_extra, 0))  # official: extra tokens -> row 0
    N = h * w + num_extra
    bias = attn.relative_position_bias_table[index.view(-1)].view(N, N, -1).permute(2, 0, 1)
    B, _, C = x.shape
    heads, d = attn.num_heads, C // attn.num_heads
    qkv = attn.qkv(x).reshape(B, N, 3, heads, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    scores = q @ k.transpose(-2, -1) / math.sqrt(d) + bias
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)
    return attn.proj(out)


@pytest.mark.parametrize("grid,num_extra", [((4, 4), 1), ((3, 5), 4), ((7, 7), 33)])
def test_sdpa_attention_equals_explicit_reference(grid, num_extra):
    torch.manual_seed(0)
    attn = RelativeAttention(64, grid, num_heads=8)
    with torch.no_grad():
        attn.relative_position_bias_table.normal_(0, 1.)  # a bias that matters
    x = torch.randn(2, grid[0] * grid[1] + num_extra, 64, requires_grad=True)
    ref = _reference_attention(attn, x, num_extra)
    grads_ref = torch.autograd.grad(ref.square().sum(), [x, attn.relative_position_bias_table])
    for impl, force_sdpa in (("sdpa", True), ("sdpa", False), ("explicit", False)):
        attn.attn_impl = impl
        attn.sdpa_grad_on_cpu = force_sdpa  # True: SDPA also with a table gradient on CPU (as on CUDA)
        out = attn(x)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        grads = torch.autograd.grad(out.square().sum(), [x, attn.relative_position_bias_table])
        for g, g_ref in zip(grads, grads_ref):
            torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4)
    # Extra tokens read row 0 only; the last row is never read.
    bias = attn.relative_position_bias(num_extra)
    torch.testing.assert_close(bias[:, :num_extra, :], attn.relative_position_bias_table[0][:, None, None]
                               .expand(-1, num_extra, bias.shape[-1]))
    torch.testing.assert_close(bias[:, :, :num_extra], attn.relative_position_bias_table[0][:, None, None]
                               .expand(-1, bias.shape[-1], num_extra))
    assert grads_ref[1][-1].abs().max() == 0


def test_model_logits_sdpa_equal_explicit(small_meta_model):
    m = small_meta_model
    x, meta = torch.randn(2, 3, SMALL, SMALL), torch.randn(2, 4 + 3 + 18)
    with torch.inference_mode():
        sdpa = m.set_attn_impl("sdpa")(x, meta)
        explicit = m.set_attn_impl("explicit")(x, meta)
    torch.testing.assert_close(sdpa, explicit, atol=1e-5, rtol=1e-5)
    # The no-grad mask cache of the SDPA path follows in-place updates of the tables (optimizer steps).
    table = m.stage_3[1].attn.relative_position_bias_table
    saved = table.detach().clone()
    try:
        with torch.no_grad():
            table.add_(torch.randn_like(table))
            explicit_new = m.set_attn_impl("explicit")(x, meta)
            sdpa_new = m.set_attn_impl("sdpa")(x, meta)
        torch.testing.assert_close(sdpa_new, explicit_new, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(sdpa_new, sdpa, atol=1e-4)
    finally:
        with torch.no_grad():
            table.copy_(saved)
        m.set_attn_impl("sdpa")
    with pytest.raises(ValueError, match="attn_impl"):
        m.set_attn_impl("flash")


# ---------------------------------------------------------------------------------------------
# timm-like surface and trainer helpers
# ---------------------------------------------------------------------------------------------

def test_timm_surface(small_meta_model):
    m = small_meta_model
    assert [f["reduction"] for f in m.feature_info] == [4, 4, 8, 16, 32]
    assert [f["num_chs"] for f in m.feature_info] == [32, 48, 96, 64, 128]
    assert m.meta_dims == (4, 3, 6)
    assert m.pretrained_cfg["input_size"] == (3, SMALL, SMALL) and m.pretrained_cfg["interpolation"] == "bicubic"
    x = torch.randn(1, 3, SMALL, SMALL)
    with torch.inference_mode():
        feats = m.forward_features(x)
        torch.testing.assert_close(m.forward_head(feats), m(x))
        torch.testing.assert_close(m.forward_head(feats, pre_logits=True), feats)
    clone = _meta_model("metaformer_0", num_classes=7, img_size=SMALL)
    clone.reset_classifier(11)
    assert clone.head.out_features == 11 and clone.num_classes == 11
    clone.reset_classifier(0)
    assert isinstance(clone.head, torch.nn.Identity)


def test_param_groups_follow_the_official_exclusions():
    m = _meta_model("metaformer_0", num_classes=10, img_size=SMALL, meta_dims=(4, 3))
    decay, no_decay = param_groups_for_weight_decay(m, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    named = dict(m.named_parameters())
    for n in ("cls_token_1", "cls_token_2", "head.bias", "norm.weight", "stage_1.0._se_reduce.bias",
              "aggregate.bias", "stage_3.0.patch_embed.proj.bias", "meta_1_head_1.3.norm_fn1.weight"):
        assert id(named[n]) in ids(no_decay), n
    for n in ("stage_3.1.attn.qkv.weight", "aggregate.weight", "head.weight", "meta_2_head_2.0.weight",
              "stage_3.0.attn.relative_position_bias_table"):  # the official code decays the tables
        assert id(named[n]) in ids(decay), n
    assert len(ids(decay)) + len(ids(no_decay)) == len(named)
    _, no_decay = param_groups_for_weight_decay(m, 0.05, no_decay_keywords=("relative_position_bias_table",))
    assert id(named["stage_3.0.attn.relative_position_bias_table"]) in ids(no_decay)


def test_meta_dropout_mask():
    g = torch.Generator().manual_seed(0)
    present = meta_dropout_mask(10, 2, 0.35, generator=g)
    assert present.dtype == torch.bool and present.shape == (10, 2)
    dropped = (~present).all(1)
    assert dropped.sum() == 3 and (present.all(1) | dropped).all()  # whole meta vectors, floor(B*p)
    assert meta_dropout_mask(4, 2, 0.).all() and not meta_dropout_mask(4, 2, 1.).any()


def test_is_a_metaformer():
    assert isinstance(_meta_model("metaformer_1"), MetaFormer)


def test_benchmark_runs():
    """repotools.benchmark_fgvc (tools/benchmark_fgvc.py) end to end on a tiny input: rows for both attention paths and
    both precisions, equal logits between the paths in fp32, bf16 logits close to fp32."""
    from repotools.benchmark_fgvc import metaformer_benchmark
    lines = []
    rows = metaformer_benchmark(models=["metaformer_0"], sizes=[64], batch=1, repeats=1, warmup=0, attn_repeats=1,
                                train=False, device="cpu", amp=["off", "bf16"], model_kwargs=TINY, print_fn=lines.append)
    assert len(rows) == 8 and sum(line.startswith("| metaformer_0") for line in lines) == 8
    by = {(r["kind"], r["attn"], r["amp"]): r for r in rows}
    for kind in ("model", "attention layer"):
        assert by[(kind, "sdpa", "off")]["max_diff"] == 0.0
        assert by[(kind, "sdpa", "off")]["diff_vs_explicit"] < 1e-4  # the two attention paths agree in fp32
        assert by[(kind, "sdpa", "bf16")]["max_diff"] < 0.1  # bf16 against fp32: a few roundings of O(1) logits
    out = {impl: by[("model", impl, "off")] for impl in ("sdpa", "explicit")}
    assert out["sdpa"]["infer_vs_explicit"] > 0 and out["explicit"]["infer_vs_explicit"] == 1.0


# ---------------------------------------------------------------------------------------------
# One registry API: timm.create_model builds the same models after `import fgvc`
# ---------------------------------------------------------------------------------------------

def test_timm_create_model_is_fgvc_create_model():
    import timm
    assert set(fgvc.list_models()) <= set(timm.list_models("metaformer*"))
    kw = dict(num_classes=5, img_size=64, meta_dims=[4, 3])
    torch.manual_seed(0)
    a = timm.create_model("metaformer_tiny", **kw).eval()
    torch.manual_seed(0)
    b = fgvc.create_model("metaformer_tiny", **kw).eval()
    assert type(a) is type(b) is MetaFormer
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.device("meta"):
        big = timm.create_model("metaformer_0", num_classes=1000)
    assert abs(sum(p.numel() for p in big.parameters()) / 1e6 - official.OFFICIAL_PARAM_COUNTS_M[("metaformer_0", 224)]) < 0.05
    with pytest.raises(ValueError, match="no downloadable weights"):
        timm.create_model("metaformer_tiny", pretrained=True)


def test_tiny_variant_and_timm_layers():
    from timm.layers import DropPath, Mlp
    m = fgvc.create_model("metaformer_tiny", num_classes=3, img_size=32, meta_dims=[4], drop_path_rate=0.1)
    assert 0.2e6 < sum(p.numel() for p in m.parameters()) < 0.5e6
    assert any(isinstance(x, DropPath) for x in m.modules()) and any(isinstance(x, Mlp) for x in m.modules())
    assert m.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)
    out = m.eval()(torch.randn(2, 3, 32, 32), torch.randn(2, 4))
    assert out.shape == (2, 3)

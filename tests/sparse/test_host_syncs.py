"""No host-device synchronisation per layer: index tensors are built once per scale.

A ``TorchDispatchMode`` (`sparse_mim.utils.host_sync`) records the aten ops of a forward + backward
of a backbone after its maps and index tables exist (a second pass over the same input); no op may
read a value back (``item``, ``_local_scalar_dense``, ``is_nonzero``), have a data-dependent size
(``nonzero``, ``masked_select``) or index by a bool mask, and every ``segment_reduce`` runs with
``unsafe=True``. On CUDA each of those stalls the host once per layer; on the CPU the same aten
calls are made, so they are recorded here. (On a GPU, tools/gpu_check.sh's section ``syncs`` also
runs the full pre-training step under ``torch.cuda.set_sync_debug_mode``.)
"""
import pytest
import torch

import sparse_mim
from sparse_mim.sparse import SparseMap, autotune
from sparse_mim.sparse import functional as SF
from sparse_mim.sparse import kernels
from sparse_mim.sparse.convert import active_mask
from sparse_mim.testing import random_visible_mask
from sparse_mim.utils.host_sync import record_host_syncs
from tests.backbones.test_backbone_families import FAMILIES

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def conv_mode(request):
    previous = autotune.set_mode(getattr(request, "param", "table"))
    yield
    autotune.set_mode(previous)


def test_recorder_flags_every_kind_of_sync():
    """Negative control: each pattern the engine must avoid is recorded; index tensors are not."""
    x = torch.randn(6, 3)
    mask = torch.tensor([True, False, True, True, False, False])
    idx = torch.tensor([0, 2, 3])
    with record_host_syncs() as rec:
        x[mask]
        torch.zeros(6, 3).index_put((mask,), x[idx])
        mask.nonzero()
        float(x.sum())
        bool(mask.any())
        torch.segment_reduce(x, "sum", lengths=torch.tensor([2, 4]), axis=0)
    reasons = [r for r, _ in rec.syncs]
    assert reasons == ["index with a bool mask", "index_put with a bool mask", "nonzero", "_local_scalar_dense",
                       "_local_scalar_dense", "segment_reduce without unsafe=True"], reasons
    with record_host_syncs() as rec:
        x.index_select(0, idx)
        torch.zeros(6, 3).index_put((idx,), x[idx])
        torch.segment_reduce(x, "sum", lengths=torch.tensor([2, 4]), axis=0, unsafe=True)
    assert rec.syncs == []


def _second_pass(name, sparse, kwargs):
    torch.manual_seed(0)
    model = sparse_mim.create_backbone(name, sparse=sparse, drop_path_rate=0.0, **kwargs).train()
    visible = random_visible_mask(2, 2, 2, 0.5, torch.Generator().manual_seed(3))
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    if sparse:
        x = SparseMap.from_dense(images, visible)  # the maps: built once, their index tables on the first pass
        x.features.requires_grad_()

        def run():
            outs = model.forward_features(x)
            sum((o.dense() * (i + 1)).sum() for i, o in enumerate(outs)).backward()
        run()
        with record_host_syncs() as rec:
            run()
        return rec
    x = images.requires_grad_()
    with active_mask(visible):
        def run():
            outs = model.forward_features(x)
            sum((o * (i + 1)).sum() for i, o in enumerate(outs)).backward()
        run()
        with record_host_syncs() as rec:
            run()
    return rec


@pytest.mark.parametrize("name", list(FAMILIES))
def test_no_sync_per_layer_in_any_family(name, conv_mode):
    for sparse in (True, False):
        rec = _second_pass(name, sparse, FAMILIES[name])
        assert rec.ops["convolution"] + rec.ops["mm"] + rec.ops["bmm"] > 0  # the pass was recorded
        assert not rec.syncs, f"{name} {'sparse' if sparse else 'dense-masked'}:\n{rec.summary()}"


@pytest.mark.parametrize("conv_mode", ["gather", "windows", "dense"], indirect=True)
@pytest.mark.parametrize("name", ["resnet18", "convnextv2_atto", "seresnet50"])
def test_no_sync_per_layer_on_every_conv_path(name, conv_mode):
    rec = _second_pass(name, True, FAMILIES[name])
    assert not rec.syncs, f"{name} {autotune.get_mode()}:\n{rec.summary()}"


def test_segment_reduce_lengths_valid_by_construction():
    """The invariant `SF.segment_reduce` relies on (lengths >= 0, summing to the row count) at every scale a map
    reaches: from an image, through strided ops, back from the dense fallback; and its results equal the dense
    reductions (GRN's sums, a squeeze-excitation gate's mean, amax with hidden zeros)."""
    from sparse_mim.sparse import dispatch
    images = torch.randn(3, 5, 64, 96, dtype=torch.float64)
    visible = random_visible_mask(3, 2, 3, 0.6, torch.Generator().manual_seed(0))
    x = SparseMap.from_dense(images, visible)
    maps = [x]
    for s in (2, 4, 8):
        m = SF.coarse_map(x, (s, s))
        maps.append(m.replace_features(m.gather_sites(torch.randn(3, 5, 64 // s, 96 // s,
                                                                  dtype=torch.float64).permute(0, 2, 3, 1))))
    maps.append(dispatch.fallback(torch.nn.functional.interpolate, (maps[1],), {"scale_factor": 2.0}, maps[1]))
    for m in maps:
        lengths = m.sites_per_sample
        assert int(lengths.min()) >= 0 and int(lengths.sum()) == m.num_sites
        dense = m.dense()
        assert torch.allclose(SF._segment_sum(m, m.features), dense.sum((2, 3)), rtol=1e-12, atol=1e-12)
        assert torch.allclose(kernels.spatial_reduce(m, "mean"), dense.mean((2, 3)), rtol=1e-12, atol=1e-12)
        assert torch.equal(kernels.spatial_reduce(m, "amax"), dense.amax((2, 3)))
        assert torch.equal(kernels.spatial_reduce(m, "amin"), dense.amin((2, 3)))

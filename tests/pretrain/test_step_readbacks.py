"""The pre-training step reads scalars back from the device once per optimizer step, not once per value.

Recorded with a TorchDispatchMode (sparse_mim.utils.host_sync) on the CPU: every synchronising aten
call and every `read_back` made by the training loop's own code (pretrain_loop.py, utils/*.py; the
model's per-forward map building is the model's and is covered by tests/sparse/test_host_syncs.py).
"""
import torch

from sparse_mim.pretrain_loop import train_one_epoch
from sparse_mim.utils.training_run import TrainState
from sparse_mim.spark import SparK, param_groups
from sparse_mim.utils.amp import resolve_amp
from sparse_mim.utils.host_sync import record_host_syncs

LOOP_FILES = ("pretrain_loop.py", "amp.py", "misc.py", "distributed.py", "schedules.py")


def _loop_syncs(rec):
    """Syncs whose innermost project frame is the training loop's code (not the model's)."""
    out = []
    for reason, where in rec.syncs:
        innermost = where.split(" <- ")[0] if where else ""
        if innermost.split(":")[0] in LOOP_FILES:
            out.append((reason, innermost))
    return out


def _run(steps, accum, amp="off", loss_hook=None):
    from timm.optim import Lamb
    torch.manual_seed(0)
    model = SparK("resnet18", input_size=64, decoder_width=32, depths=(1, 1, 1, 1))
    opt = Lamb(param_groups(model, 0.04), lr=1e-3, max_grad_norm=None)
    g = torch.Generator().manual_seed(1)
    loader = [(torch.randn(2, 3, 64, 64, generator=g), torch.tensor([2 * i, 2 * i + 1]), torch.tensor([0, i % 2]))
              for i in range(steps * accum)]
    policy = resolve_amp(amp, "cpu")
    state = TrainState()
    logged = []
    # timm's LAMB keeps its step counter in a CPU tensor (host-side in a CUDA run too): reading it is no sync
    with record_host_syncs(host=lambda t: any(t is g.get("step") for g in opt.param_groups)) as rec:
        train_one_epoch(model, loader, opt, lambda s: 1e-3, state, amp=policy, scaler=policy.make_scaler(),
                        accum_steps=accum, clip_grad=5.0, log_fn=lambda d, s: logged.append((s, d)), log_every=100)
    return rec, state, logged


def test_one_read_back_per_optimizer_step():
    for accum in (1, 2):
        rec, state, logged = _run(steps=2, accum=accum)
        syncs = _loop_syncs(rec)
        assert [r for r, _ in syncs] == ["read_back"] * 2, (accum, syncs)
        # the values it brought back are the ones the loop reports
        assert state.step == 2 and state.images_seen == 2 * accum * 2
        assert state.failed_images == sum(i % 2 for i in range(2 * accum))
        (step, first), = logged  # log_every=100: step 1 only
        assert step == 1 and first["train/images_seen"] == 2 * accum and first["train/loss"] == state.first_loss
        assert torch.isfinite(torch.tensor(first["train/grad_norm"])) and first["train/loss_scale"] == 1.0


def test_fp16_adds_only_gradscalers_own_read():
    """Under fp16 the scale travels in the same read-back; torch's GradScaler.step reads its inf flag itself."""
    rec, state, _ = _run(steps=1, accum=1, amp="fp16")
    reasons = [r for r, _ in _loop_syncs(rec)]
    assert reasons.count("read_back") == 1 and len(reasons) <= 2, reasons

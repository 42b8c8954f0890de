"""sparse_mim.utils.amp: what each ``amp`` setting resolves to, and the shared optimizer step."""
import copy
import math

import pytest
import torch

from sparse_mim.utils import amp as amp_mod
from sparse_mim.utils.amp import AmpError, load_scaler_state, optimizer_step, resolve_amp

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.precision]

CPU = torch.device("cpu")


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Pretend the CPU does (True) or does not (False) have bf16 instructions."""
    def set_(native: bool):
        monkeypatch.setattr(amp_mod, "cpu_bf16_support", lambda: (native, "test says so"))
    return set_


@pytest.fixture
def cuda_cc(monkeypatch):
    """Pretend to be a CUDA device of the given compute capability (nothing runs on it)."""
    def set_(major: int, minor: int = 0):
        monkeypatch.setattr(amp_mod, "cuda_capability", lambda device: (major, minor))
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: major >= 8)
    return set_


# ---------------------------------------------------------------------------- resolution table
@pytest.mark.parametrize("native, name", [(True, "bf16"), (False, "fp32")])
def test_auto_on_cpu(cpu_bf16, native, name):
    cpu_bf16(native)
    p = resolve_amp("auto", CPU)
    assert p.name == name and p.use_scaler is False
    assert p.dtype == (torch.bfloat16 if native else None)
    assert p.reason and "\n" not in p.reason


@pytest.mark.parametrize("cc, name, dtype, scaler", [
    ((9, 0), "bf16", torch.bfloat16, False), ((8, 0), "bf16", torch.bfloat16, False),
    ((7, 5), "fp16", torch.float16, True), ((7, 0), "fp16", torch.float16, True)])
def test_auto_on_cuda(cuda_cc, cc, name, dtype, scaler):
    cuda_cc(*cc)
    p = resolve_amp("auto", torch.device("cuda", 0))
    assert (p.name, p.dtype, p.use_scaler, p.device_type) == (name, dtype, scaler, "cuda")


def test_explicit_settings(cpu_bf16, cuda_cc):
    cpu_bf16(False)
    p = resolve_amp("bf16", CPU)   # honoured (emulated), and said so
    assert p.dtype == torch.bfloat16 and "emulated" in p.reason
    assert resolve_amp("fp16", CPU).use_scaler
    assert resolve_amp("off", CPU).dtype is None
    cuda_cc(7, 5)
    with pytest.raises(AmpError, match="bf16 needs 8.0"):
        resolve_amp("bf16", "cuda:0")
    assert resolve_amp("fp16", "cuda:0").use_scaler
    assert resolve_amp("off", "cuda:0").name == "fp32"
    assert resolve_amp("auto", "mps").name == "fp32"


@pytest.mark.parametrize("alias, name", [(True, "auto"), (False, "off"), ("bfloat16", "bf16"),
                                         ("float16", "fp16"), (" BF16 ", "bf16"), ("none", "off"),
                                         (torch.bfloat16, "bf16"), (None, "off")])
def test_aliases(cpu_bf16, alias, name):
    cpu_bf16(True)
    assert resolve_amp(alias, CPU).setting == name


def test_unknown_setting_message():
    with pytest.raises(AmpError, match=r"amp='fp8': must be one of auto, bf16, fp16, off"):
        resolve_amp("fp8", CPU)


def test_cpu_probe_is_consistent():
    native, evidence = amp_mod.cpu_bf16_support()
    assert isinstance(native, bool) and evidence
    flags = amp_mod._cpuinfo_flags()
    if flags & {"avx512_bf16", "amx_bf16"}:
        assert native


def test_autocast_and_scaler(cpu_bf16):
    cpu_bf16(True)
    p = resolve_amp("auto", CPU)
    lin = torch.nn.Linear(4, 3)
    with p.autocast():
        y = lin(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16 and lin.weight.dtype == torch.float32
    assert p.make_scaler() is None
    off = resolve_amp("off", CPU)
    with off.autocast():
        assert lin(torch.randn(2, 4)).dtype == torch.float32
    assert isinstance(resolve_amp("fp16", CPU).make_scaler(), torch.amp.GradScaler)
    d = p.as_dict()
    assert d["amp"] == "bf16" and "bf16" in p.describe()


# ---------------------------------------------------------------------------- optimizer step
def _model_and_data(seed=0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    x, y = torch.randn(8, 8, generator=g), torch.randn(8, 1, generator=g)
    return model, x, y


def test_step_equals_plain_loop():
    """fp32, no accumulation: identical to backward + clip + step written out by hand."""
    model, x, y = _model_and_data()
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for _ in range(3):
        res = optimizer_step(torch.nn.functional.mse_loss(model(x), y), opt, clip_grad=0.5)
        torch.nn.functional.mse_loss(ref(x), y).backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        ref_opt.step()
        ref_opt.zero_grad()
        assert res.stepped and not res.skipped and res.grad_norm == pytest.approx(float(ref_norm))
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert a.grad is None


def test_accumulation_equals_full_batch():
    model, x, y = _model_and_data()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    results = [optimizer_step(torch.nn.functional.mse_loss(model(xc), yc), opt, accum_steps=2, boundary=i == 1)
               for i, (xc, yc) in enumerate(zip(x.chunk(2), y.chunk(2)))]
    assert [r.stepped for r in results] == [False, True] and math.isnan(results[0].grad_norm)
    optimizer_step(torch.nn.functional.mse_loss(ref(x), y), ref_opt)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("setting", ["off", "bf16", "fp16"])
def test_nonfinite_gradients_never_reach_weights(setting):
    """A NaN gradient is skipped under every mode (fp16: by the scaler, which also lowers its scale)."""
    policy = resolve_amp(setting, CPU)
    scaler = policy.make_scaler()
    model, x, y = _model_and_data()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    with policy.autocast():
        loss = torch.nn.functional.mse_loss(model(x).float(), y) * torch.tensor(float("nan"))
    res = optimizer_step(loss, opt, scaler=scaler, clip_grad=1.0)
    assert res.stepped and res.skipped and not math.isfinite(res.grad_norm)
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)
    assert not opt.state or all(not s for s in opt.state.values())
    if scaler is not None:
        assert scaler.get_scale() < res.scale
    # and the next finite step goes through
    with policy.autocast():
        loss = torch.nn.functional.mse_loss(model(x).float(), y)
    res = optimizer_step(loss, opt, scaler=scaler, clip_grad=1.0)
    assert res.stepped and not res.skipped and math.isfinite(res.grad_norm)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), before))


@pytest.mark.parametrize("setting", ["bf16", "fp16"])
def test_low_precision_training_keeps_fp32_master_state(setting):
    """Weights, grads and optimizer state stay fp32; a few steps land near the fp32 run."""
    runs = {}
    for s in ("off", setting):
        policy = resolve_amp(s, CPU)
        scaler = policy.make_scaler()
        model, x, y = _model_and_data()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(5):
            with policy.autocast():
                loss = torch.nn.functional.mse_loss(model(x).float(), y)
            res = optimizer_step(loss, opt, scaler=scaler, clip_grad=1.0)
            assert not res.skipped
        assert all(p.dtype == torch.float32 and p.grad is None for p in model.parameters())
        assert all(v.dtype == torch.float32 for st in opt.state.values() for v in st.values() if v is not None)
        runs[s] = [p.detach() for p in model.parameters()]
    # the largest weight moves ~0.36 over the 5 steps; low-precision gradients differ by a few
    # roundings (bf16 2^-8, fp16 2^-11 relative), measured 1.7e-3 (bf16) / 1.2e-4 (fp16) apart:
    # 1e-2 (3% of the update) leaves room for other CPUs' kernels and still catches a wrong step.
    for a, b in zip(runs["off"], runs[setting]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-2)


def test_scaler_state_resume_across_settings():
    fp16 = resolve_amp("fp16", CPU).make_scaler()
    assert load_scaler_state(fp16, None) is False       # bf16/fp32 checkpoint resumed as fp16
    assert load_scaler_state(None, fp16.state_dict()) is False  # fp16 checkpoint resumed as bf16
    other = torch.amp.GradScaler("cpu", init_scale=1024.0)
    other.scale(torch.ones(()))
    assert load_scaler_state(fp16, other.state_dict()) is True
    assert fp16.get_scale() == 1024.0


def test_step_without_loss_after_separate_backward():
    """fgvc's pattern: micro-batches through optimizer_step(boundary=False), then optimizer_step(None) steps."""
    model, x, y = _model_and_data()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for xc, yc in zip(x.chunk(2), y.chunk(2)):
        assert not optimizer_step(torch.nn.functional.mse_loss(model(xc), yc), opt, accum_steps=2, boundary=False).stepped
    res = optimizer_step(None, opt, clip_grad=1.0)
    optimizer_step(torch.nn.functional.mse_loss(ref(x), y), ref_opt, clip_grad=1.0)
    assert res.stepped and not res.skipped
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="accum_steps"):
        optimizer_step(None, opt, accum_steps=0)

"""amp=auto on CUDA follows one table per GPU generation (sparse_mim.utils.amp.CUDA_AUTO_TABLE), with the
reason printed at run start; the GPU check compares its measurements with it (no GPU needed to read it)."""
import pytest
import torch

from sparse_mim.utils import amp as amp_mod
from sparse_mim.utils.amp import CUDA_AUTO_TABLE, cuda_auto_rule, resolve_amp


@pytest.mark.parametrize("cc, generation, name, scaler", [
    ((7, 0), "Volta", "fp16", True), ((7, 5), "Turing", "fp16", True), ((8, 0), "Ampere", "bf16", False),
    ((8, 6), "Ampere", "bf16", False), ((8, 9), "Ada", "bf16", False), ((9, 0), "Hopper", "bf16", False),
    ((10, 0), "Blackwell", "bf16", False), ((12, 0), "Blackwell", "bf16", False), ((6, 1), "Pascal", "fp32", False),
])
def test_auto_follows_the_table(monkeypatch, cc, generation, name, scaler):
    monkeypatch.setattr(amp_mod, "cuda_capability", lambda device: cc)
    policy = resolve_amp("auto", torch.device("cuda"))
    assert (policy.name, policy.use_scaler) == (name, scaler)
    assert generation in policy.reason and f"compute capability {cc[0]}.{cc[1]}" in policy.reason
    assert "not measured on this generation yet" in policy.reason  # nothing measured: said at run start
    assert cuda_auto_rule(cc).generation.startswith(generation)


def test_table_is_ordered_and_complete():
    caps = [r.min_capability for r in CUDA_AUTO_TABLE]
    assert caps == sorted(caps, reverse=True) and caps[-1] == (0, 0)
    assert all(r.choice in ("bf16", "fp16", "off") for r in CUDA_AUTO_TABLE)
    # the reason for bf16 names the spconv trade-off it makes
    assert "use_f32_as_accum" in cuda_auto_rule((9, 0)).reason

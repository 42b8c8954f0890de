"""The GPU check's logic that a CPU can run: the torch-build / GPU refusal, the amp=auto verdict against the
table in code, results written as each check finishes. (Its CPU dry run, DDP with 2 gloo processes included,
is `GPU_CHECK_DEVICE=cpu GPU_CHECK_QUICK=1 bash tools/gpu_check.sh`: minutes, not part of the suite.)"""
import json

import torch

from repotools import gpu_check

CU130 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]
CU126 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]


def test_build_runs_on():
    assert not gpu_check.build_runs_on((7, 0), CU130)      # V100 under a CUDA 13 build
    assert gpu_check.build_runs_on((7, 0), CU126)
    assert gpu_check.build_runs_on((8, 9), CU130)          # sm_86 cubins run on sm_89 (same major)
    assert not gpu_check.build_runs_on((7, 5), ["sm_80", "sm_90"])
    assert gpu_check.build_runs_on((10, 3), ["sm_90", "compute_90"])  # PTX is JIT-compiled for newer GPUs
    assert not gpu_check.build_runs_on((8, 0), ["sm_90", "compute_90"])


def test_refuses_early_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: CU130)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    ran = []
    monkeypatch.setattr(gpu_check, "check_precision", lambda *a: ran.append("precision"))
    assert gpu_check.run_checks("cuda", out=str(tmp_path), only=["env", "precision"]) == 1
    assert ran == []  # nothing after env ran
    (env,) = json.load(open(tmp_path / "results.json"))
    assert env["status"] == "FAIL" and "none for Tesla V100-SXM2-32GB (sm_70)" in env["detail"]
    assert "tools/setup_env.sh" in env["detail"] and "whl/cu126" in env["detail"]


def test_amp_verdict_against_the_table():
    agree, text = gpu_check.amp_verdict(["bf16", "bf16"], (9, 0), "H100")
    assert agree and "the table in code says bf16: AGREES" in text
    agree, text = gpu_check.amp_verdict(["fp16", "fp16"], (9, 0), "NVIDIA H100 80GB HBM3")
    assert not agree and "update its Hopper line" in text and 'choice="fp16"' in text
    agree, _ = gpu_check.amp_verdict(["fp32+tf32"], (7, 0), "V100")
    assert not agree  # the table says fp16 on Volta


def test_results_written_as_they_come(tmp_path):
    gpu_check.RESULTS.clear()
    gpu_check._OUT["dir"] = str(tmp_path)
    try:
        gpu_check.record("a", "PASS", "first")
        assert json.load(open(tmp_path / "results.json"))[0]["check"] == "a"
        gpu_check.record("b", "WARN", "second")
        lines = (tmp_path / "results.jsonl").read_text().splitlines()
        assert [json.loads(x)["check"] for x in lines] == ["a", "b"]
    finally:
        gpu_check._OUT["dir"] = None
        gpu_check.RESULTS.clear()

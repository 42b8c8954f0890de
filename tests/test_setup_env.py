"""tools/setup_env.sh picks the torch build from the GPU's compute capability (a fake nvidia-smi on PATH);
without a GPU it keeps the pinned PyPI set (what CI and the README's first command get)."""
import os
import shutil
import stat
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "setup_env.sh")


def _choice(tmp_path, smi_output=None, exit_code=0, env=None):
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    if smi_output is not None:
        smi = fake / "nvidia-smi"
        smi.write_text("#!/bin/sh\n"
                       "case \"$*\" in *compute_cap*) printf '%s' \"$FAKE_SMI\";; *) echo unexpected >&2; exit 2;; esac\n"
                       f"exit {exit_code}\n")
        smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    run_env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "FAKE_SMI": smi_output or ""}
    run_env.pop("TORCH_CUDA", None)
    run_env.update(env or {})
    out = subprocess.run(["bash", SCRIPT, "--print-torch-choice"], capture_output=True, text=True, env=run_env,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return dict(line.split("=", 1) for line in out.stdout.strip().splitlines()), out.stderr


@pytest.mark.parametrize("smi, build", [
    ("7.0\n", "cu126"),            # V100: CUDA 13 builds have no sm_70 kernels
    ("6.1\n", "cu126"),            # Pascal
    ("7.5\n", "pypi"),             # T4
    ("8.0\n", "pypi"), ("9.0\n", "pypi"), ("12.0\n", "pypi"),
    ("9.0\n7.0\n9.0\n", "cu126"),  # mixed node: the oldest GPU decides
])
def test_build_follows_compute_capability(tmp_path, smi, build):
    choice, _ = _choice(tmp_path, smi)
    assert choice["torch_build"] == build, choice
    assert choice["gpu_compute_capability"] == min(smi.split(), key=lambda v: tuple(map(int, v.split("."))))
    if build == "cu126":
        assert "https://download.pytorch.org/whl/cu126" in choice["torch"] and "sm_75" in choice["why"]
    else:
        assert "from" not in choice["torch"]


def test_no_gpu_keeps_the_pinned_pypi_set(tmp_path):
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has a real nvidia-smi")
    choice, _ = _choice(tmp_path)
    assert choice == {"gpu_compute_capability": "none", "torch_build": "pypi", "torch": choice["torch"],
                      "why": "no NVIDIA GPU found (nvidia-smi absent or silent): the pinned set from PyPI"}
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        pin = next(line.split("==")[1].strip() for line in f if line.startswith("torch=="))
    assert choice["torch"] == pin


def test_failing_nvidia_smi_is_no_gpu_and_override(tmp_path):
    choice, _ = _choice(tmp_path, "NVIDIA-SMI has failed because it couldn't communicate with the driver\n",
                        exit_code=9)
    assert choice["torch_build"] == "pypi" and choice["gpu_compute_capability"] == "none"
    choice, _ = _choice(tmp_path, "9.0\n", env={"TORCH_CUDA": "cu128"})
    assert choice["torch_build"] == "cu128" and choice["torch"].endswith("https://download.pytorch.org/whl/cu128")


def test_too_old_gpu_is_said(tmp_path):
    choice, err = _choice(tmp_path, "3.7\n")
    assert choice["torch_build"] == "pypi" and "no current torch build has kernels for it" in err

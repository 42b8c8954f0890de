"""The one checkpoint module: atomic writes, finite states only, disk full, orphans, resume fallback, reading."""
import errno
import os
import stat

import pytest
import torch

from sparse_mim.utils import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _state(value=1.0):
    model = torch.nn.BatchNorm1d(3)
    model.running_var.fill_(value)
    return {"model": model.state_dict(), "train_state": {"step": int(value) if abs(value) < 1e9 else 0}}


def test_written_files_are_0644_with_format_version(tmp_path):
    p = ckpt.save_checkpoint(_state(), tmp_path / "last.pth")
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o644
    assert ckpt.load_checkpoint(p)["format_version"] == ckpt.FORMAT_VERSION
    t = ckpt.atomic_write_text(tmp_path / "a.json", "{}")
    assert stat.S_IMODE(os.stat(t).st_mode) == 0o644 and open(t).read() == "{}"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_state_is_refused_and_previous_kept(tmp_path, bad):
    p = str(tmp_path / "last.pth")
    ckpt.save_checkpoint(_state(2.0), p)
    with pytest.raises(ckpt.NonFiniteStateError, match=r"refusing to write .*previous checkpoint is intact.*running_var"):
        ckpt.save_checkpoint(_state(bad), p)
    assert ckpt.load_checkpoint(p)["train_state"]["step"] == 2
    # optimizer moments are checked too
    opt_state = {"optimizer": {"state": {0: {"exp_avg_sq": torch.tensor([1.0, bad])}}}}
    with pytest.raises(ckpt.NonFiniteStateError, match="optimizer.state.0.exp_avg_sq"):
        ckpt.save_checkpoint(opt_state, p)
    # and readers that ask for it refuse a non-finite file written by someone else
    torch.save(_state(bad), tmp_path / "foreign.pth")
    with pytest.raises(ckpt.NonFiniteStateError, match="not usable"):
        ckpt.load_checkpoint(tmp_path / "foreign.pth", check_finite=True)


def test_disk_full_message_and_no_temp_left(tmp_path, monkeypatch):
    p = str(tmp_path / "last.pth")
    ckpt.save_checkpoint(_state(), p)

    def full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(ckpt.DiskFullError, match=r"no space left on device while writing .*last.pth; the previous "
                                                 r"checkpoint is intact"):
        ckpt.save_checkpoint(_state(3.0), p)
    with pytest.raises(ckpt.DiskFullError, match="nothing was written"):
        ckpt.save_checkpoint(_state(3.0), str(tmp_path / "new.pth"))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["last.pth"]
    assert ckpt.load_checkpoint(p)["train_state"]["step"] == 1


def test_orphan_temps_removed(tmp_path):
    for i in range(3):
        (tmp_path / f".last.pth.abc{i}.tmp").write_bytes(b"x" * 10)
    (tmp_path / ".config.yaml.q.tmp").write_bytes(b"")
    assert len(ckpt.remove_orphan_temps(str(tmp_path), "last.pth")) == 3
    assert os.listdir(tmp_path) == [".config.yaml.q.tmp"]
    (tmp_path / ".last.pth.zz.tmp").write_bytes(b"x")
    ckpt.save_checkpoint(_state(), tmp_path / "last.pth")  # a successful write also sweeps its orphans
    assert sorted(os.listdir(tmp_path)) == [".config.yaml.q.tmp", "last.pth"]
    assert len(ckpt.remove_orphan_temps(str(tmp_path))) == 1


def test_read_errors_are_distinct(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "missing.pth")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        ckpt.load_checkpoint(tmp_path)
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match="empty"):
        ckpt.load_checkpoint(tmp_path / "empty.pth")
    good = ckpt.save_checkpoint(_state(), tmp_path / "good.pth")
    data = open(good, "rb").read()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="truncated"):
        ckpt.load_checkpoint(tmp_path / "cut.pth")
    (tmp_path / "text.pth").write_text("hello, not a checkpoint\n")
    with pytest.raises(ckpt.CheckpointError, match="not a PyTorch file"):
        ckpt.load_checkpoint(tmp_path / "text.pth")


def test_resume_auto_falls_back_to_newest_loadable(tmp_path):
    ckpt.save_checkpoint(_state(4.0), tmp_path / ckpt.checkpoint_name(4))
    ckpt.save_checkpoint(_state(8.0), tmp_path / ckpt.checkpoint_name(8))
    data = open(tmp_path / ckpt.checkpoint_name(8), "rb").read()
    (tmp_path / "last.pth").write_bytes(data[:100])  # truncated last.pth
    torch.save(_state(float("nan")), tmp_path / ckpt.checkpoint_name(9))  # non-finite newer keep
    said = []
    path, ck = ckpt.find_resumable(str(tmp_path), log=said.append)
    assert path.endswith(ckpt.checkpoint_name(8)) and ck["train_state"]["step"] == 8
    text = "\n".join(said)
    assert "skipping" in text and "last.pth" in text and "NaN" in text and "newest loadable" in text
    assert ckpt.find_resumable(str(tmp_path / "nothing"), log=None) == (None, None)


def test_unwrap_state_dict_forms():
    w = {"a.weight": torch.ones(1)}
    for wrapped in ({"model": w}, {"state_dict": w}, {"module": w}, {"model": {"module." + k: v for k, v in w.items()}},
                    {"state_dict_ema": w, "config": {}}, w):
        assert ckpt.unwrap_state_dict(wrapped).keys() == w.keys()
    both = {"model": {"x": torch.zeros(1)}, "state_dict_ema": {"x": torch.ones(1)}}
    assert float(ckpt.unwrap_state_dict(both)["x"]) == 0 and float(ckpt.unwrap_state_dict(both, prefer_ema=True)["x"]) == 1
    with pytest.raises(ValueError, match="no weights"):
        ckpt.unwrap_state_dict({"config": {}})


def test_full_disk_at_start_leaves_no_config_temp(tmp_path, monkeypatch):
    from sparse_mim.utils.config import save_config

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(ckpt.DiskFullError, match=r"config.yaml; nothing was written"):
        save_config({"seed": 0}, str(tmp_path))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []

"""cudnn.benchmark and channels-last: one decision (sparse_mim.utils.device_perf) used by both trainers,
the benchmarks and the GPU check."""
import pytest
import torch

from sparse_mim.utils import device_perf
from sparse_mim.utils.device_perf import PerfSettings, apply_perf_settings, perf_settings


def test_decision_per_device():
    cuda, cpu = perf_settings("cuda"), perf_settings("cpu")  # the decision needs no GPU to be read
    assert (cuda.cudnn_benchmark, cuda.channels_last) == (True, True)
    assert (cpu.cudnn_benchmark, cpu.channels_last) == (False, False)
    assert "cudnn.benchmark on, channels-last on" in cuda.describe()
    previous = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = True
        apply_perf_settings("cpu")
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = previous


def _is_cl(t):
    return t.dim() == 4 and t.shape[1] > 1 and t.shape[2] * t.shape[3] > 1 and \
        t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def test_prepare_model_converts_the_dense_convs_only():
    from sparse_mim.spark import SparK
    torch.manual_seed(0)
    sparse = SparK("resnet18", input_size=64, decoder_width=64)
    dense = sparse.dense_reference()
    settings = PerfSettings("cuda", True, True, "test")
    params = {n: p for n, p in sparse.named_parameters()}
    settings.prepare_model(sparse)
    assert all(p is params[n] for n, p in sparse.named_parameters())  # same Parameter objects (optimizer state)
    dec = [p for p in sparse.dense_decoder.parameters() if p.dim() == 4 and p.shape[2] > 1]
    assert dec and all(_is_cl(p) for p in dec)
    assert not any(_is_cl(p) for p in sparse.backbone.parameters())
    settings.prepare_model(dense)
    assert any(_is_cl(p) for p in dense.backbone.parameters())
    cpu = perf_settings("cpu")
    fresh = SparK("resnet18", input_size=64, decoder_width=64)
    cpu.prepare_model(fresh)
    assert not any(_is_cl(p) for p in fresh.parameters())


@pytest.fixture
def spy(monkeypatch):
    calls = []
    original = device_perf.apply_perf_settings

    def record(device, model=None):
        calls.append((torch.device(device), model))
        return original(device, model)
    monkeypatch.setattr(device_perf, "apply_perf_settings", record)
    return calls


def test_pretraining_applies_the_decision(tmp_path, spy, capsys):
    from tests.pretrain.test_pretrain import TINY, run
    run(TINY + [f"output_dir={tmp_path}", "data.builtin_images=4", "data.batch_size=2", "train.epochs=1",
                "train.conv_backend=table"])
    assert len(spy) == 1 and spy[0][0].type == "cpu" and hasattr(spy[0][1], "dense_decoder")
    assert "cudnn.benchmark off, channels-last off" in capsys.readouterr().out


def test_fgvc_training_applies_the_decision(tmp_path, spy):
    from fgvc.demo import make_demo_dataset
    from fgvc.train import train
    from tests.fgvc.test_fgvc_train import _cfg
    root = str(tmp_path / "data")
    make_demo_dataset(root, n_looks=2, train_per_class=4, test_per_class=2, image_size=32, seed=1)
    lines = []
    train(_cfg(root, str(tmp_path / "run"), "train.epochs=1", "data.batch_size=4", "optim.lr_base_batch=4"),
          log=lines.append)
    assert len(spy) == 1 and spy[0][0].type == "cpu" and isinstance(spy[0][1], torch.nn.Module)
    assert any("cudnn.benchmark off, channels-last off" in str(line) for line in lines)


def test_pretrain_benchmark_applies_the_decision(spy):
    from repotools.benchmark_sparse import pretrain_benchmark
    pretrain_benchmark(backbones=["resnet18"], batch=2, input_size=[64], steps=1, warmup=0, decoder_width=64,
                       modes=("table", "dense"), print_fn=lambda *a: None, progress=lambda *a: None)
    assert spy and spy[0][0].type == "cpu"

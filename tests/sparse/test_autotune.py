"""The conv autotuner: what it times, what it keeps, and that tuning never changes a number or a side effect."""
import json
import os

import pytest
import torch
from torch import nn

from sparse_mim.sparse import SparseMap, autotune, functional as SF, sparsify
from sparse_mim.testing import assert_equivalent, patch_mask

pytestmark = pytest.mark.usefixtures("one_torch_thread")
F64 = torch.float64


@pytest.fixture
def tuner(tmp_path):
    """Autotune mode, empty memory, cache file under tmp_path; everything restored afterwards."""
    previous_mode = autotune.set_mode("autotune")
    previous_budget = autotune.get_budget()
    saved = dict(autotune._S.choices)
    autotune.reset()
    autotune.set_cache(tmp_path / "cache")
    yield tmp_path / "cache"
    autotune.set_mode(previous_mode)
    autotune.set_budget(**previous_budget)
    autotune.set_cache(None)
    autotune.reset()
    autotune._S.choices.update(saved)


def _map(B=4, gh=4, gw=6, C=8, factor=4, ratio=0.6, dtype=F64, grad=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, gh * factor, gw * factor, generator=g, dtype=dtype)
    sm = SparseMap.from_dense(x, patch_mask(B, gh, gw, ratio))
    return sm.replace_features(sm.features.detach().requires_grad_(grad))


def _only(kind):
    return [c for c in autotune.choices().values() if c["op"] == kind]


@pytest.mark.parametrize("kind,cin,cout,k,stride,groups,expected", [
    ("conv", 8, 16, 3, 1, 1, {"gather", "windows", "dense", "spconv"}),
    ("depthwise", 8, 8, 7, 1, 8, {"gather", "windows", "dense"}),
    ("strided_conv", 8, 16, 3, 2, 1, {"gather", "dense"}),
    ("strided_depthwise", 8, 8, 3, 2, 8, {"gather", "dense"}),
])
def test_every_candidate_is_timed_once_and_the_choice_is_exact(tuner, kind, cin, cout, k, stride, groups, expected):
    from sparse_mim.sparse.spconv_backend import spconv_available
    if not spconv_available():
        expected = expected - {"spconv"}
    sm = _map(C=cin)
    w = torch.randn(cout, cin // groups, k, k, dtype=F64, requires_grad=True)
    y = SF.conv2d(sm, w, None, stride, k // 2, groups=groups)
    (chosen,) = _only(kind)
    assert set(chosen["times_ms"]) == expected
    assert all(isinstance(v, float) and v > 0 for v in chosen["times_ms"].values())
    assert chosen["path"] in expected and chosen["source"] == "tuned" and chosen["grad"]
    spent = autotune.tuning_seconds()
    assert spent > 0
    # the next call with the same configuration is a lookup: no more tuning
    y2 = SF.conv2d(sm, w, None, stride, k // 2, groups=groups)
    assert autotune.tuning_seconds() == spent and len(autotune.choices()) == 1
    # and its numbers are those of every forced path
    for path in expected:
        previous = SF.set_conv_backend(path)
        try:
            ref = SF.conv2d(sm, w, None, stride, k // 2, groups=groups)
        finally:
            SF.set_conv_backend(previous)
        assert torch.allclose(y.features, ref.features, rtol=1e-10, atol=1e-10), path
        assert torch.allclose(y2.features, ref.features, rtol=1e-10, atol=1e-10), path


def test_tuning_leaves_rng_autograd_and_bn_statistics_alone(tuner):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 7, padding=3, groups=8), nn.Dropout(0.5)).to(F64)
    x, vis = torch.randn(4, 8, 16, 24, dtype=F64), patch_mask(4, 4, 6, 0.6)
    runs = {}
    for mode in ("table", "autotune"):
        autotune.set_mode(mode)
        net = sparsify(__import__("copy").deepcopy(model)).train()
        xs = x.clone().requires_grad_()
        torch.manual_seed(1)
        out = net(SparseMap.from_dense(xs, vis))
        after = torch.rand(3)  # the next draw of the RNG stream: tuning must not have consumed any
        out.features.sum().backward()
        runs[mode] = (out.features.detach(), after, xs.grad, net[0].weight.grad, net[1].running_mean.clone(),
                      net[1].running_var.clone(), net[1].num_batches_tracked.clone())
    assert len(autotune.choices()) == 2 and autotune.tuning_seconds() > 0
    for a, b in zip(runs["table"], runs["autotune"]):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_forward_only_call_is_tuned_forward_only_and_keeps_no_grad(tuner):
    sm = _map(grad=False)
    w = torch.randn(8, 8, 3, 3, dtype=F64, requires_grad=True)
    with torch.no_grad():
        SF.conv2d(sm, w, None, 1, 1)
    (c,) = autotune.choices().values()
    assert c["grad"] is False and w.grad is None
    SF.conv2d(sm, w, None, 1, 1).features.sum().backward()  # a training call is another configuration
    assert len(autotune.choices()) == 2 and w.grad is not None


def test_forced_and_table_modes_do_not_time(tuner):
    sm = _map()
    w = torch.randn(8, 8, 3, 3, dtype=F64)
    wd = torch.randn(8, 1, 3, 3, dtype=F64)
    for mode in ("table", "auto", "gather", "windows", "dense", "spconv"):
        SF.set_conv_backend(mode)
        SF.conv2d(sm, w, None, 1, 1)
        SF.conv2d(sm, wd, None, 1, 1, groups=8)
        SF.conv2d(sm, w, None, 2, 1)
    # nothing timed; each configuration is recorded once, by the first fixed mode that met it (for the table)
    assert autotune.tuning_seconds() == 0 and len(autotune.choices()) == 3
    assert {c["source"] for c in autotune.choices().values()} == {"table"}
    assert all(c["times_ms"] == {} for c in autotune.choices().values())
    assert SF.get_conv_backend() == "spconv"
    assert SF.set_conv_backend("auto") == "spconv" and SF.get_conv_backend() == "table"
    with pytest.raises(ValueError, match="unknown conv backend 'fastest'.*autotune"):
        SF.set_conv_backend("fastest")


def test_forced_path_falls_back_to_gather_where_the_op_lacks_it(tuner):
    call_paths = []
    real = autotune.run_candidate

    def spy(call, name):
        call_paths.append((call.kind, name))
        return real(call, name)

    autotune.run_candidate = spy
    try:
        sm = SparseMap.from_dense(torch.randn(2, 8, 8, 8, dtype=F64), patch_mask(2, 8, 8, 0.5))  # patch factor 1
        SF.set_conv_backend("windows")
        SF.conv2d(sm, torch.randn(8, 8, 3, 3, dtype=F64), None, 1, 1)
        SF.set_conv_backend("spconv")
        SF.conv2d(sm, torch.randn(8, 1, 3, 3, dtype=F64), None, 1, 1, groups=8)
        SF.conv2d(sm, torch.randn(8, 8, 3, 3, dtype=F64), None, 2, 1)
    finally:
        autotune.run_candidate = real
    assert call_paths == [("conv", "gather"), ("depthwise", "gather"), ("strided_conv", "gather")]


def test_slow_and_failing_candidates_are_not_chosen(tuner):
    def slow(call):  # the gather path with 20 times its work (CPU time: a sleep would not count)
        out = SF._run_gather(call)
        for _ in range(20):
            out = out + 0 * SF._run_gather(call)
        return out

    def boom(call):
        raise RuntimeError("out of memory (simulated)")

    autotune.register_candidate("conv", "slow", slow)
    autotune.register_candidate("conv", "boom", boom)
    autotune.set_budget(per_config_s=30, repeats=1)
    try:
        SF.conv2d(_map(), torch.randn(8, 8, 3, 3, dtype=F64), None, 1, 1)
    finally:
        del autotune._REGISTRY["conv"]["slow"], autotune._REGISTRY["conv"]["boom"]
    (c,) = autotune.choices().values()
    assert c["path"] not in ("slow", "boom")
    assert c["times_ms"]["slow"] > c["times_ms"]["gather"]
    assert c["times_ms"]["boom"].startswith("failed: RuntimeError: out of memory")


def test_budgets(tuner):
    sm = _map()
    w = torch.randn(8, 8, 3, 3, dtype=F64)
    autotune.set_budget(per_config_s=1e-9)  # the table's choice and dense are still timed, the rest skipped
    SF.conv2d(sm, w, None, 1, 1)
    (c,) = autotune.choices().values()
    table = SF._table_rule(autotune.OpCall("conv", sm, w, (3, 3), (1, 1), (1, 1), (1, 1), 1, sm))
    timed = {n for n, t in c["times_ms"].items() if isinstance(t, float)}
    assert timed == {table, "dense"} - {None}
    assert all(t == "skipped (budget)" for n, t in c["times_ms"].items() if n not in timed)
    autotune.set_budget(total_s=autotune.tuning_seconds())  # total spent: new configurations take the table
    SF.conv2d(sm, torch.randn(16, 8, 3, 3, dtype=F64), None, 1, 1)
    c2 = [c for c in autotune.choices().values() if c["out"] == 16][0]
    assert c2["source"] == "budget" and c2["path"] == table and c2["times_ms"] == {}
    with pytest.raises(ValueError, match="must be > 0"):
        autotune.set_budget(per_config_s=0)


def test_cache_file_round_trip_and_versions(tuner):
    sm = _map()
    w = torch.randn(8, 8, 3, 3, dtype=F64)
    SF.conv2d(sm, w, None, 1, 1)
    path = autotune.cache_file("cpu")
    assert path.startswith(str(tuner)) and os.path.isfile(path)
    data = json.load(open(path))
    assert data["meta"]["torch"] == torch.__version__ and data["meta"]["device"].startswith("cpu")
    (key, entry), = data["entries"].items()
    tuned = autotune.choices()[key]["path"]
    assert entry["path"] == tuned
    # a new process (memory forgotten) reads the choice back without timing anything
    autotune.reset()
    SF.conv2d(sm, w, None, 1, 1)
    assert autotune.tuning_seconds() == 0 and autotune.choices()[key]["source"] == "cache"
    # the file pins choices: edit it and the edit is used
    other = "dense" if tuned != "dense" else "gather"
    data["entries"][key]["path"] = other
    json.dump(data, open(path, "w"))
    autotune.reset()
    SF.conv2d(sm, w, None, 1, 1)
    assert autotune.choices()[key]["path"] == other
    # a file written by another torch version is ignored
    data["meta"]["torch"] = "0.0.1"
    json.dump(data, open(path, "w"))
    autotune.reset()
    SF.conv2d(sm, w, None, 1, 1)
    assert autotune.choices()[key]["source"] == "tuned"


def test_cache_off_and_env(tuner, tmp_path, monkeypatch):
    assert autotune.set_cache("off") is None
    SF.conv2d(_map(), torch.randn(8, 8, 3, 3, dtype=F64), None, 1, 1)
    assert not os.path.exists(tuner)
    autotune.set_cache(None)
    monkeypatch.setenv("SPARSE_MIM_AUTOTUNE_CACHE", str(tmp_path / "env"))
    assert autotune.cache_file("cpu").startswith(str(tmp_path / "env"))
    monkeypatch.setenv("SPARSE_MIM_AUTOTUNE_CACHE", "off")
    assert autotune.cache_file("cpu") is None
    assert autotune.set_cache(tmp_path / "one.json") == str(tmp_path / "one.json")


def test_report_once_and_log_dict(tuner):
    sm = _map()
    SF.conv2d(sm, torch.randn(8, 8, 3, 3, dtype=F64), None, 1, 1)
    SF.conv2d(sm, torch.randn(8, 1, 7, 7, dtype=F64), None, 1, 3, groups=8)
    printed = []
    text = autotune.report(printed.append)
    assert printed == [text] and "| 16x24 | conv | 3x3 | 8>8 |" in text and "| 16x24 | depthwise | 7x7 |" in text
    assert autotune.report(printed.append) == "" and len(printed) == 1  # printed once
    d = autotune.log_dict()
    assert d["mode"] == "autotune" and d["configs"] == 2 and d["tuned"] == 2 and d["tuning_s"] > 0
    assert set(d["choices"]) == {"conv 3x3 8>8 @16x24", "depthwise 7x7 8>8 @16x24"}
    json.dumps(d)  # loggable as it is


def test_sync_choices_adopts_rank0(tuner):
    sm = _map()
    SF.conv2d(sm, torch.randn(8, 8, 3, 3, dtype=F64), None, 1, 1)
    key = next(iter(autotune.choices()))
    mine = autotune._S.choices[key]
    other = "dense" if mine.path != "dense" else "gather"
    rank0 = {key: {"path": other, "times_ms": {}, "source": "tuned", "tuning_s": 0.1, "desc": mine.desc},
             "conv|only-rank0": {"path": "gather", "times_ms": {}, "source": "tuned", "tuning_s": 0.0,
                                 "desc": mine.desc}}
    sent = []

    def fake_broadcast(obj):
        sent.append(obj)
        return rank0

    assert autotune.sync_choices(fake_broadcast) == 2
    assert key in sent[0]
    assert autotune.choices()[key]["path"] == other and autotune.choices()[key]["source"] == "rank 0"
    SF.conv2d(sm, torch.randn(8, 8, 3, 3, dtype=F64), None, 1, 1)  # runs rank 0's path, no tuning
    assert autotune.choices()[key]["path"] == other
    assert autotune.sync_choices() == 0  # no process group: nothing to do


def test_autocast_is_part_of_the_key(tuner):
    sm = _map(dtype=torch.float32)
    w = torch.randn(8, 8, 3, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = SF.conv2d(sm, w, None, 1, 1)
    assert y.features.dtype == torch.bfloat16
    (c,) = autotune.choices().values()
    assert c["autocast"] == "bfloat16" and c["dtype"] == "bfloat16" and "spconv" not in c["times_ms"]
    SF.conv2d(sm, w, None, 1, 1)
    assert len(autotune.choices()) == 2


def test_configure_and_config_keys(tuner):
    keys = autotune.CONFIG_DEFAULTS
    assert keys["conv_backend"].default == "autotune" and keys["conv_backend"].validate("windows") is None
    assert keys["conv_backend"].validate("fastest") is not None
    d = autotune.configure("table", "off")
    assert d["mode"] == "table" and d["cache"] == "off"
    autotune.configure("autotune", str(tuner))
    assert autotune.cache_file("cpu").startswith(str(tuner))


@pytest.mark.precision
def test_backbone_equivalence_under_autotune(tuner):
    """A small ResNet-style stack (stride-1, strided, depthwise, pointwise) tuned, against the dense-masked twin."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.Conv2d(8, 8, 5, padding=2, groups=8), nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16),
                        nn.Conv2d(16, 16, 3, 2, 1)).to(F64)
    x, vis = torch.randn(4, 3, 32, 48, dtype=F64), patch_mask(4, 4, 6, 0.6)
    assert_equivalent(net, x, vis)
    kinds = {c["op"] for c in autotune.choices().values()}
    assert kinds == {"conv", "depthwise", "strided_conv"}


def _rank_main(rank, world, init_file, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        autotune.set_cache(False)
        key = "conv|k3x3|example"  # ranks tuned the same configuration and disagree (noisy timings)
        desc = {"op": "conv", "kernel": [3, 3], "stride": [1, 1], "dilation": [1, 1], "groups": 1, "in": 8,
                "out": 8, "size": [16, 24], "patch": 4, "sites": 128, "dtype": "float32", "device": "cpu",
                "autocast": "none", "grad": True, "threads": 1}
        autotune._S.choices[key] = autotune.Choice(["gather", "dense"][rank], {}, "tuned", 0.0, desc)
        log = autotune.settle(print_fn=None)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"path": autotune._S.choices[key].path, "log": log}, f)
    finally:
        dist.destroy_process_group()


def test_settle_in_a_two_process_gloo_group(tmp_path):
    """Every rank ends with rank 0's choice (real torch.distributed broadcast, 2 CPU processes)."""
    import torch.multiprocessing as mp
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    assert [r["path"] for r in results] == ["gather", "gather"]
    assert results[1]["log"]["choices"] == results[0]["log"]["choices"]


def test_benchmark_library_compares_modes(tuner):
    """The benchmark logic (repotools.benchmark_sparse) runs an op under each mode and reports the path each ran."""
    from repotools.benchmark_sparse import run_op_case, sparse_ops_benchmark
    r = run_op_case("conv3x3", 8, 8, lambda c: nn.Conv2d(c, 8, 3, padding=1, bias=False), batch=2, size=64,
                    repeats=1, mode="dense")
    assert r["path"] == "dense" and r["fwd_err"] < 1e-5 and r["grad_err"] < 1e-5 and r["tune_ms"] == 0
    lines = []
    autotune.set_budget(per_config_s=0.01, repeats=1)  # keep the tuning short: one timed run per candidate
    rows = sparse_ops_benchmark(batch=1, size=64, repeats=1, only=["dw7x7"], modes=("autotune", "table"),
                                print_fn=lines.append)
    assert [r["mode"] for r in rows] == ["autotune", "table"] * 4
    assert all(r["path"] in ("gather", "windows", "dense") for r in rows)
    assert any(line.startswith("autotune choices") for line in lines)


def test_a_configuration_met_in_a_fixed_mode_is_tuned_in_autotune_mode(tuner):
    sm = _map()
    w = torch.randn(8, 8, 3, 3, dtype=F64)
    SF.set_conv_backend("dense")
    SF.conv2d(sm, w, None, 1, 1)
    (first,) = autotune.choices().values()
    assert first["source"] == "dense" and first["path"] == "dense"
    SF.set_conv_backend("autotune")
    SF.conv2d(sm, w, None, 1, 1)
    (tuned,) = autotune.choices().values()
    assert tuned["source"] in ("tuned", "budget") and len(tuned["times_ms"]) >= 2

"""The autotune cache is shared state nobody can break: any wrong shape is reported once naming the file and
ignored (then rewritten with good entries); four processes tuning into one cache at once keep every entry."""
import json
import os
import subprocess
import sys
import time
import warnings

import pytest
import torch

from sparse_mim.sparse import SparseMap, autotune, functional as SF
from sparse_mim.testing import patch_mask

pytestmark = pytest.mark.usefixtures("one_torch_thread")
F64 = torch.float64


@pytest.fixture
def tuner(tmp_path):
    previous_mode = autotune.set_mode("autotune")
    saved = dict(autotune._S.choices)
    autotune.reset()
    autotune._S.warned_files.clear()
    path = autotune.set_cache(tmp_path / "cache.json")
    yield path
    autotune.set_mode(previous_mode)
    autotune.set_cache(None)
    autotune.reset()
    autotune._S.choices.update(saved)


def _conv(C=8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, C, 16, 16, generator=g, dtype=F64)
    sm = SparseMap.from_dense(x, patch_mask(2, 4, 4, 0.5))
    return SF.conv2d(sm, torch.randn(C, 1, 3, 3, dtype=F64), None, 1, 1, groups=C)  # depthwise: no spconv warm-up


def _meta():
    return autotune._meta(torch.device("cpu"))


@pytest.mark.parametrize("content", [
    "[1, 2, 3]", "null", "17", '"text"', "{", "\xff\xfe not utf-8",
    json.dumps({"meta": "META", "entries": [1, 2]}),
    json.dumps({"meta": "META", "entries": {"k1": "a string", "k2": {"path": ["gather"]}, "k3": None,
                                            "k4": {"path": "gather", "times_ms": "fast"}}}),
    "[" * 100000 + "]" * 100000,
])
def test_a_cache_of_any_wrong_shape_is_reported_once_and_rebuilt(tuner, content):
    text = content.replace('"META"', json.dumps(_meta()))
    with open(tuner, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(text)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _conv()             # tunes (nothing usable in the file) and rewrites the file
        autotune.reset()
        autotune._S.disk = None
        _conv(16)           # another configuration: the file is read again, nothing more reported
    about = [str(w.message) for w in caught if "autotune cache" in str(w.message)]
    assert len(about) == 1 and tuner in about[0], about
    data = json.load(open(tuner))
    assert data["meta"] == _meta() and len(data["entries"]) == 2
    assert all(isinstance(e["path"], str) for e in data["entries"].values())


def test_a_good_entry_next_to_bad_ones_is_kept(tuner):
    _conv()
    data = json.load(open(tuner))
    (key, good), = data["entries"].items()
    data["entries"]["junk"] = "a string"
    json.dump(data, open(tuner, "w"))
    autotune.reset()
    autotune._S.disk = None
    with pytest.warns(UserWarning, match="1 entry of the wrong shape"):
        _conv()
    assert autotune.choices()[key]["source"] == "cache" and autotune.tuning_seconds() == 0


_CHILD = r"""
import sys, time, torch
from sparse_mim.sparse import SparseMap, autotune, functional as SF
from sparse_mim.testing import patch_mask
torch.set_num_threads(1)
cache, idx, start = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
autotune.set_mode("autotune")
autotune.set_cache(cache)
x = torch.randn(2, 8 + 8 * idx, 16, 16, dtype=torch.float64)
sm = SparseMap.from_dense(x, patch_mask(2, 4, 4, 0.5))
w = torch.randn(8 + 8 * idx, 1, 3, 3, dtype=torch.float64)
while time.time() < start:
    time.sleep(0.002)
SF.conv2d(sm, w, None, 1, 1, groups=8 + 8 * idx)  # a real tuning (depthwise), written to the shared file
dev = torch.device("cpu")
for j in range(25):                               # and many more writes, all at the same time
    autotune._save_disk(dev, f"p{idx}-{j}", autotune.Choice("gather", {"gather": 1.0}, "tuned", 0.0, {"op": "x"}))
import json
print("KEYS", json.dumps(list(autotune.choices())))
"""


def test_four_processes_tuning_at_once_keep_every_entry(tmp_path):
    cache = str(tmp_path / "shared.json")
    start = time.time() + 6
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="default")
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, cache, str(i), str(start)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for i in range(4)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=240))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    tuned = {k for out, _ in outs for line in out.splitlines() if line.startswith("KEYS ")
             for k in json.loads(line[5:])}
    entries = json.load(open(cache))["entries"]
    expected = {f"p{i}-{j}" for i in range(4) for j in range(25)} | tuned
    assert len(tuned) == 4 and set(entries) == expected, sorted(expected - set(entries))[:10]
    assert not any("cannot write the autotune cache" in err for _, err in outs)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]

"""A recipe from elsewhere is bounded: size cap, alias-expansion budget, truncated values in messages,
duplicate keys and non-UTF-8 bytes refused naming the file. Each case runs in a subprocess with a memory and
time limit, so the old unbounded behaviour fails the test instead of taking the machine down."""
import os
import subprocess
import sys
import textwrap

import pytest

from sparse_mim.train import DEFAULTS, validate_config
from sparse_mim.utils import config as config_module
from sparse_mim.utils.config import ConfigError, load_config, short_repr

CONFIG_PY = config_module.__file__


def _bomb(levels: int = 9) -> str:
    """A flow list whose items anchor lists of ten aliases of the previous one: 10^levels values once expanded."""
    items = ['&a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        items.append(f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    return "[" + ", ".join(items) + "]"


def _load_in_child(recipe: str, timeout: float = 60, mem_gb: float = 1.0) -> subprocess.CompletedProcess:
    """The recipe loader (config.py alone, no torch) in a child limited to mem_gb of address space and
    ``timeout`` seconds, with a schema like the trainers' (an image size checked by a function, a free-form
    section); prints the one-line ConfigError and exits 2 like the commands do."""
    code = textwrap.dedent(f"""
        import importlib.util, resource, sys
        lim = int({mem_gb} * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
        spec = importlib.util.spec_from_file_location("cfg", {CONFIG_PY!r})
        cfg = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(cfg)
        schema = {{"seed": cfg.K(0, "seed"), "model": {{
            "img_size": cfg.K([64, 64], "size", check=lambda v: None if v == [64, 64] else "expected [64, 64]"),
            "backbone_kwargs": cfg.K({{}}, "free-form")}}}}
        try:
            cfg.load_config(schema, {recipe!r}, [])
        except cfg.ConfigError as e:
            print("error:", e, file=sys.stderr)
            sys.exit(2)
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


def test_alias_bomb_inside_a_valid_key_is_refused_quickly(tmp_path):
    recipe = tmp_path / "bomb.yaml"
    # a 10^9-value alias bomb inside a valid key, whose value is checked (and shown in the error)
    recipe.write_text("seed: 1\nmodel:\n  img_size: " + _bomb() + "\n")
    r = _load_in_child(str(recipe))
    assert r.returncode == 2, r.stderr[-2000:]
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and str(recipe) in line[0] and "aliases expand to more than" in line[0]
    assert len(line[0]) < 600


def test_big_value_in_an_error_is_truncated():
    err = None
    try:
        load_config(DEFAULTS, None, ["model.img_size=[" + ",".join(["70"] * 20000) + "]"], validate=validate_config)
    except ConfigError as e:
        err = str(e)
    assert err is not None and "model.img_size" in err and len(err) < 800
    assert len(short_repr(list(range(10**6)))) <= 160


def test_huge_recipe_is_refused_by_size(tmp_path):
    recipe = tmp_path / "huge.yaml"
    with open(recipe, "w") as f:
        f.write("seed: 1\n")
        f.write("# " + "x" * 100 + "\n" * 1)
        for i in range(330_000):  # ~33 MB
            f.write(f"k{i}: [" + "1, " * 30 + "1]\n")
    r = _load_in_child(str(recipe), timeout=30)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "MiB" in r.stderr and str(recipe) in r.stderr and "above the" in r.stderr


def test_duplicate_keys_name_both_lines(tmp_path):
    recipe = tmp_path / "dup.yaml"
    recipe.write_text("seed: 1\noptim:\n  lr: 0.1\n  betas: [0.9, 0.95]\n  lr: 0.2\n")
    with pytest.raises(ConfigError) as e:
        load_config(DEFAULTS, str(recipe), [], validate=validate_config)
    msg = str(e.value)
    assert str(recipe) in msg and "'lr' appears twice (lines 3 and 5)" in msg
    with pytest.raises(ConfigError, match="appears twice"):
        load_config(DEFAULTS, None, ["model.backbone_kwargs={a: 1, a: 2}"], validate=validate_config)


def test_yaml_merge_keys_still_override(tmp_path):
    recipe = tmp_path / "merge.yaml"
    recipe.write_text("x: &x {lr: 0.1, clip_grad: 1.0}\n")  # unknown top-level key: read, then refused by name
    with pytest.raises(ConfigError, match="unknown config key 'x'"):
        load_config(DEFAULTS, str(recipe), [])
    recipe.write_text("optim:\n  <<: {lr: 0.1, clip_grad: 1.0}\n  lr: 0.3\n")
    cfg = load_config(DEFAULTS, str(recipe), [])
    assert cfg.optim.lr == 0.3 and cfg.optim.clip_grad == 1.0


def test_invalid_utf8_names_the_file_and_a_bom_is_fine(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("wandb:\n  name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        load_config(DEFAULTS, str(bad), [])
    assert str(bad) in str(e.value) and "not UTF-8" in str(e.value) and "line 2" in str(e.value)
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbfseed: 7\n")
    assert load_config(DEFAULTS, str(bom), []).seed == 7


def test_recursive_alias_is_refused(tmp_path):
    recipe = tmp_path / "loop.yaml"
    recipe.write_text("model:\n  backbone_kwargs: &k {depths: *k}\n")
    with pytest.raises(ConfigError, match="refers to its own anchor"):
        load_config(DEFAULTS, str(recipe), [])

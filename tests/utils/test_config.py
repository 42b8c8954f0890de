"""sparse_mim.utils.config (schema, recipes with _base_, overrides, checks, --help) and utils.cli."""
import os

import pytest

from sparse_mim.utils.cli import UsageError, run_cli
from sparse_mim.utils.config import (Config, ConfigError, K, config_help, load_config, parse_config, save_config,
                                     split_argv)

DEFAULTS = {
    "seed": 0,
    "amp": True,
    "resume": "",
    "optim": {"lr": 1e-4, "betas": [0.9, 0.95], "clip": None},
    "data": {"root": "", "input_size": 224},
}

SCHEMA = {
    "seed": K(0, "random seed", min=0),
    "output_dir": K("outputs/x", "where everything is written"),
    "model": {
        "mask_ratio": K(0.6, "fraction of patches hidden", gt=0.0, lt=1.0),
        "kwargs": K({}, "extra model arguments"),
    },
    "optim": {
        "batch_size": K(16, "per process", min=1),
        "betas": K([0.9, 0.95], "optimizer betas", length=2, item_min=0.0, item_lt=1.0),
        "scale": K([0.67, 1.0], "crop scale", length=2, item_gt=0.0, item_max=1.0,
                   check=lambda v: None if v[0] <= v[1] else "expected [min, max] with min <= max"),
        "epochs": K(4.0, "may be fractional", gt=0.0),
    },
    "train": {"amp": K("auto", "mixed precision", choices=("auto", "bf16", "fp16", "off"))},
    "ckpt": {"path": K(None, "optional file")},
}


# ----------------------------------------------------------------------------- loading and types
def test_config_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 2e-4\ndata:\n  input_size: 96\n")
    cfg = load_config(DEFAULTS, str(f), ["optim.lr=1e-3", "data.root=/x", "amp=false", "optim.betas=[0.9,0.999]",
                                         "optim.clip=5"])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.data.input_size == 96 and cfg.data.root == "/x" and cfg.amp is False
    assert cfg.optim.betas == [0.9, 0.999] and cfg.optim.clip == 5
    # "2e-4" in YAML 1.1 is a string: coerced to float against the default
    cfg2 = load_config(DEFAULTS, str(f))
    assert cfg2.optim.lr == 2e-4
    assert DEFAULTS["optim"]["lr"] == 1e-4  # defaults untouched


def test_config_unknown_key_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"Did you mean 'optim\.lr'"):
        load_config(DEFAULTS, None, ["optim.lrr=1"])
    f = tmp_path / "c.yaml"
    f.write_text("dta:\n  root: /x\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'dta' \(from .*c\.yaml\).*see --help"):
        load_config(DEFAULTS, str(f))


@pytest.mark.parametrize("item", ["seed=abc", "amp=maybe", "optim.lr=fast", "data.input_size=1.5", "optim=3"])
def test_config_type_errors(item):
    with pytest.raises(ConfigError):
        load_config(DEFAULTS, None, [item])


def test_config_types_follow_code_defaults_not_earlier_overrides(tmp_path):
    defaults = {"size": [224, 224], "x": 1.0}
    f = tmp_path / "c.yaml"
    f.write_text("size: 192\nx: 2\n")
    cfg = load_config(defaults, str(f), ["size=[224,160]", "x=3"])
    assert cfg.size == [224, 160] and cfg.x == 3.0 and isinstance(cfg.x, float)
    assert load_config(defaults, None, ["size=96", "size=[64,96]"]).size == [64, 96]


def test_config_free_form_section():
    cfg = load_config({"kw": {}, "n": 1}, None, ["kw={depths: [1, 1], width: 8}"])
    assert cfg.kw == {"depths": [1, 1], "width": 8}


def test_save_config_round_trip_leaves_no_temp_file(tmp_path):
    cfg = load_config(SCHEMA, None, ["seed=3"])
    path = save_config(cfg, str(tmp_path))
    assert load_config(SCHEMA, path) == cfg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


# ----------------------------------------------------------------------------- schema checks
def test_schema_defaults_are_plain_values():
    cfg = load_config(SCHEMA)
    assert cfg.model.mask_ratio == 0.6 and cfg.train.amp == "auto" and cfg.ckpt.path is None
    assert cfg.model.kwargs == {} and isinstance(cfg, Config)


@pytest.mark.parametrize("item, expect", [
    ("seed=-1", r"seed=-1 \(from command line\): expected >= 0"),
    ("model.mask_ratio=0.0", r"model.mask_ratio=0.0 .*expected > 0, < 1"),
    ("model.mask_ratio=1", r"expected > 0, < 1"),
    ("optim.batch_size=0", r"optim.batch_size=0 .*expected >= 1"),
    ("optim.betas=[0.9]", r"optim.betas=\[0.9\] .*a list of 2"),
    ("optim.betas=[0.9,1.5]", r"each item >= 0 and < 1"),
    ("optim.scale=[1.0,0.5]", r"min <= max"),
    ("optim.epochs=0", r"optim.epochs=0.0 .*expected > 0"),
    ("optim.epochs=-1", r"expected > 0"),
    ("optim.epochs=nan", r"expected > 0"),
    ("train.amp=fp8", r"train.amp='fp8' .*one of auto \| bf16 \| fp16 \| off"),
])
def test_schema_range_errors_name_key_value_and_allowed(item, expect):
    with pytest.raises(ConfigError, match=expect):
        load_config(SCHEMA, None, [item])


def test_schema_accepts_good_values_and_fractional_epochs():
    cfg = load_config(SCHEMA, None, ["optim.epochs=1.5", "optim.betas=[0.9,0.999]", "train.amp=bf16",
                                     "ckpt.path=/x.pth", "ckpt.path=null"])
    assert cfg.optim.epochs == 1.5 and cfg.train.amp == "bf16" and cfg.ckpt.path is None


def test_range_error_names_the_file_it_came_from(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("model:\n  mask_ratio: 1.5\n")
    with pytest.raises(ConfigError, match=r"model.mask_ratio=1.5 \(from .*r\.yaml\)"):
        load_config(SCHEMA, str(f))


def test_cross_key_validation_hook():
    def validate(cfg):
        if cfg.optim.batch_size > 8 and cfg.train.amp == "off":
            raise ConfigError("optim.batch_size > 8 needs train.amp")
    with pytest.raises(ConfigError, match="needs train.amp"):
        load_config(SCHEMA, None, ["train.amp=off"], validate=validate)


# ----------------------------------------------------------------------------- recipes with _base_
def test_base_inheritance_chain_and_override_order(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "common.yaml").write_text(
        "seed: 1\noutput_dir: outputs/base\nmodel:\n  mask_ratio: 0.5\n  kwargs: {depth: 2, width: 8}\n")
    (tmp_path / "base" / "model.yaml").write_text("_base_: common.yaml\nmodel:\n  mask_ratio: 0.75\n")
    (tmp_path / "data.yaml").write_text("optim:\n  batch_size: 4\n")
    (tmp_path / "recipe.yaml").write_text(
        "_base_: [base/model.yaml, data.yaml]\noutput_dir: outputs/recipe\nmodel:\n  kwargs: {width: 16}\n")
    cfg = load_config(SCHEMA, str(tmp_path / "recipe.yaml"), ["seed=7"])
    assert cfg.seed == 7 and cfg.output_dir == "outputs/recipe"
    assert cfg.model.mask_ratio == 0.75 and cfg.optim.batch_size == 4
    assert cfg.model.kwargs == {"width": 16}  # a free-form section is replaced, not merged


def test_base_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="inherits itself"):
        load_config(SCHEMA, str(tmp_path / "a.yaml"))
    (tmp_path / "c.yaml").write_text("_base_: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"missing\.yaml.*a _base_ of .*c\.yaml.*not found"):
        load_config(SCHEMA, str(tmp_path / "c.yaml"))
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(SCHEMA, str(tmp_path))
    (tmp_path / "d.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(SCHEMA, str(tmp_path / "d.yaml"))


# ----------------------------------------------------------------------------- command line
def test_split_argv_separates_own_arguments_from_overrides():
    own, over = split_argv(["ckpt.pth", "-c", "r.yaml", "--topk", "3", "--optim.batch_size", "4", "seed=2",
                            "--resume=auto", "--train.amp", "bf16", "--flag.on"], ["seed", "resume", "optim.batch_size"])
    assert own == ["ckpt.pth", "-c", "r.yaml", "--topk", "3"]
    assert over == ["optim.batch_size=4", "seed=2", "resume=auto", "train.amp=bf16", "flag.on=true"]


def test_parse_config_cli_forms(tmp_path):
    cfg, args = parse_config(DEFAULTS, ["--resume", "auto", "--optim.lr=3e-3", "seed=4"])
    assert cfg.resume == "auto" and cfg.optim.lr == 3e-3 and cfg.seed == 4
    with pytest.raises(ConfigError, match="seed"):
        parse_config(DEFAULTS, ["sed=4"])
    path = save_config(cfg, str(tmp_path))
    again = load_config(DEFAULTS, path)
    assert again == cfg and isinstance(again, Config)


def test_help_lists_every_key_with_default_meaning_and_range(capsys):
    text = config_help(SCHEMA)
    for line in ["seed = 0", "random seed (>= 0)", "model.mask_ratio = 0.6", "fraction of patches hidden (> 0, < 1)",
                 "optim.betas = [0.9, 0.95]", "train.amp = auto", "one of auto | bf16 | fp16 | off",
                 "ckpt.path = null", "model.kwargs = {}"]:
        assert line in text, line
    with pytest.raises(SystemExit) as e:
        parse_config(SCHEMA, ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "model.mask_ratio = 0.6" in out and "-c CONFIG" in out


# ----------------------------------------------------------------------------- run_cli
def test_run_cli_turns_exceptions_into_one_line_errors(capsys):
    def bad_config(argv):
        load_config(SCHEMA, None, argv)

    assert run_cli(bad_config, ["optim.batch_size=0"], prog="tool") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tool: error: optim.batch_size=0 (from command line): expected >= 1") and "\n" not in err

    def missing(argv):
        raise FileNotFoundError("checkpoint 'x.pth' not found")

    assert run_cli(missing, [], prog="tool") == 1
    assert "tool: error: FileNotFoundError: checkpoint 'x.pth' not found" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):
        run_cli(missing, ["--debug"], prog="tool")

    def usage(argv):
        raise UsageError("pass an image")

    assert run_cli(usage, [], prog="tool") == 2
    assert run_cli(lambda argv: 3, []) == 3
    assert run_cli(lambda argv: {"loss": 1.0}, []) == 0
    assert run_cli(lambda argv: parse_config(SCHEMA, ["--help"]), []) == 0


def test_shipped_recipes_resolve_by_name(tmp_path, monkeypatch):
    from sparse_mim.utils.config import resolve_recipe, shipped_recipes_dir
    root = shipped_recipes_dir()
    assert root is not None and root.endswith("configs")
    for name in ("fgvc/demo", "fgvc/demo.yaml", "configs/fgvc/demo.yaml"):
        path = resolve_recipe(name)
        assert path.endswith("demo.yaml") and os.path.isfile(path)
    monkeypatch.chdir(tmp_path)  # a relative path that exists wins over a shipped name
    (tmp_path / "fgvc").mkdir()
    (tmp_path / "fgvc" / "demo.yaml").write_text("seed: 1\n")
    assert resolve_recipe("fgvc/demo.yaml") == "fgvc/demo.yaml"
    assert resolve_recipe("nope/missing.yaml") == "nope/missing.yaml"

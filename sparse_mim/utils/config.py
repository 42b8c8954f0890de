"""One config object per run: code defaults <- YAML file <- command-line overrides.

Why this shape (timm / MAE house style): the defaults live in code next to the tool
that uses them, a YAML file in ``configs/`` sets a recipe, and any key can still be
changed on the command line as ``optim.lr=1e-3`` (or ``--optim.lr 1e-3``). Every
value is checked against the type of its default, so a typo or a wrong type fails
at start-up with a message naming the fix, not hours later. The resolved config is
written as ``config.yaml`` next to the outputs so a run can be reproduced exactly.
"""
from __future__ import annotations

import argparse
import copy
import difflib
import os
from typing import Any, Iterable, Mapping, Sequence

import yaml

__all__ = [
    "Config", "ConfigError", "load_config", "parse_config", "apply_overrides",
    "merge_config", "save_config", "flatten", "config_arg_parser",
]


class ConfigError(ValueError):
    """A config file or override that does not fit the defaults (message says how to fix it)."""


class Config(dict):
    """Nested dict with attribute access (``cfg.optim.lr``); plain dicts inside are wrapped."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for k, v in list(self.items()):
            if isinstance(v, Mapping) and not isinstance(v, Config):
                super().__setitem__(k, Config(v))

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}; valid keys: {sorted(self.keys())}") from None

    def __setattr__(self, name, value):
        self[name] = value

    def __setitem__(self, key, value):
        if isinstance(value, Mapping) and not isinstance(value, Config):
            value = Config(value)
        super().__setitem__(key, value)

    def __deepcopy__(self, memo):
        return Config(copy.deepcopy(dict(self), memo))

    def to_dict(self) -> dict:
        """Plain nested dicts (for YAML, wandb and checkpoints: weights_only-safe)."""
        return {k: v.to_dict() if isinstance(v, Config) else copy.deepcopy(v) for k, v in self.items()}


def flatten(cfg: Mapping, prefix: str = "") -> dict:
    """``{"optim": {"lr": 1}} -> {"optim.lr": 1}``."""
    out = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and len(v) > 0:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _unknown_key_error(key: str, valid: Iterable[str], source: str) -> ConfigError:
    valid = sorted(valid)
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(
        f"unknown config key {key!r} (from {source}).{hint}\n"
        f"Valid keys: {', '.join(valid)}")


_TRUE = {"true", "yes", "on", "1", "y"}
_FALSE = {"false", "no", "off", "0", "n"}


def _coerce(key: str, value: Any, default: Any, source: str) -> Any:
    """Return ``value`` converted to the type of ``default`` or raise a ConfigError.

    Strings (from the command line) are parsed as YAML scalars first, so ``lr=1e-3``,
    ``size=[224,192]`` and ``name=null`` work. A default of None accepts anything.
    """
    if isinstance(value, str) and not isinstance(default, str):
        try:
            value = yaml.safe_load(value) if value.strip() != "" else None
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}={value!r} (from {source}) is not a valid value: {e}") from None
    if default is None or value is None:
        return value
    expected = type(default)
    what = f"{key}={value!r} (from {source})"
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, str)) and str(value).lower() in _TRUE | _FALSE:
            return str(value).lower() in _TRUE
        raise ConfigError(f"{what}: expected a boolean (true/false)")
    if isinstance(default, int):
        if isinstance(value, bool):
            raise ConfigError(f"{what}: expected an integer, got a boolean")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{what}: expected an integer like {default!r}")
    if isinstance(default, float):
        if isinstance(value, bool):
            raise ConfigError(f"{what}: expected a number, got a boolean")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{what}: expected a number like {default!r}")
    if isinstance(default, str):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{what}: expected a string like {default!r}")
    if isinstance(default, (list, tuple)):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # a scalar where a list is the default (e.g. input_size=224 for [224, 224]) stays a scalar;
            # tools that accept both document it.
            return value
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ConfigError(f"{what}: expected a list like {list(default)!r}")
    if isinstance(default, Mapping):
        if len(default) == 0 and isinstance(value, Mapping):  # a free-form section (e.g. backbone kwargs)
            return dict(value)
        raise ConfigError(f"{what}: {key!r} is a section; set its keys as {key}.<name>=value")
    if not isinstance(value, expected):
        raise ConfigError(f"{what}: expected {expected.__name__}")
    return value


def _set_dotted(cfg: Config, dotted: str, value: Any, source: str, reference: Mapping | None = None) -> None:
    """Set ``cfg[a][b] = value`` for ``dotted == "a.b"``, typed like ``reference`` (the code defaults)."""
    parts = dotted.split(".")
    node, ref = cfg, reference if reference is not None else cfg
    for i, part in enumerate(parts):
        if not isinstance(node, Mapping) or part not in node:
            raise _unknown_key_error(dotted, flatten(cfg).keys(), source)
        ref_value = ref.get(part, node[part]) if isinstance(ref, Mapping) else node[part]
        if i == len(parts) - 1:
            node[part] = _coerce(dotted, value, ref_value, source)
        else:
            node, ref = node[part], ref_value


def merge_config(cfg: Config, update: Mapping, source: str = "config file", prefix: str = "",
                 reference: Mapping | None = None) -> Config:
    """Merge a (nested) mapping into ``cfg`` in place, checking every key, and types against ``reference``."""
    for k, v in update.items():
        dotted = f"{prefix}{k}"
        if isinstance(v, Mapping):
            node = cfg
            for part in dotted.split("."):
                if not isinstance(node, Mapping) or part not in node:
                    raise _unknown_key_error(dotted, flatten(cfg).keys(), source)
                node = node[part]
            if isinstance(node, Mapping) and len(node) > 0:
                merge_config(cfg, v, source, dotted + ".", reference)
                continue
        _set_dotted(cfg, dotted, v, source, reference)
    return cfg


def apply_overrides(cfg: Config, overrides: Sequence[str], reference: Mapping | None = None) -> Config:
    """Apply ``key.sub=value`` strings in place (values parsed as YAML, then type-checked)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"cannot read command-line argument {item!r}: write overrides as key=value "
                f"(e.g. optim.lr=1e-3) or --key value")
        key, value = item.split("=", 1)
        key = key.strip().lstrip("-").replace("-", "_")
        _set_dotted(cfg, key, value, "command line", reference)
    return cfg


def load_config(defaults: Mapping, config_file: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """defaults <- YAML ``config_file`` <- ``overrides``; returns a new Config."""
    cfg = Config(copy.deepcopy(dict(defaults)))
    reference = copy.deepcopy(dict(defaults))  # types are checked against the code defaults
    if config_file:
        if not os.path.isfile(config_file):
            raise ConfigError(f"config file {config_file!r} not found; pass an existing YAML file with -c/--config")
        with open(config_file) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"config file {config_file!r} is not valid YAML: {e}") from None
        if not isinstance(data, Mapping):
            raise ConfigError(f"config file {config_file!r} must hold a mapping of keys to values")
        merge_config(cfg, data, source=config_file, reference=reference)
    apply_overrides(cfg, overrides, reference)
    return cfg


def _normalise_argv(argv: Sequence[str]) -> list[str]:
    """Turn ``--optim.lr 1e-3`` / ``--optim.lr=1e-3`` into ``optim.lr=1e-3`` (config files stay as -c)."""
    out, i = [], 0
    argv = list(argv)
    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and "=" not in a:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                out.append(a[2:] + "=true")  # bare flag: a boolean switch
                i += 1
                continue
            out.append(f"{a[2:]}={argv[i + 1]}")
            i += 2
            continue
        out.append(a[2:] if a.startswith("--") else a)
        i += 1
    return out


def config_arg_parser(description: str | None = None, epilog: str | None = None) -> argparse.ArgumentParser:
    """The command line every tool shares: ``-c CONFIG.yaml`` then any number of ``key=value``."""
    p = argparse.ArgumentParser(
        description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", default=None, help="YAML recipe (e.g. configs/pretrain/resnet50.yaml)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. optim.lr=1e-3 data.root=/data (also --optim.lr 1e-3)")
    return p


def parse_config(defaults: Mapping, argv: Sequence[str] | None = None, description: str | None = None,
                 epilog: str | None = None) -> tuple[Config, argparse.Namespace]:
    """Parse ``argv`` (default ``sys.argv[1:]``) into a resolved Config and the raw arguments.

    Exits with a readable error (argparse style) on an unknown key or a wrong type.
    """
    import sys
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = config_arg_parser(description, epilog)
    # -c/--config and --print-config are the tool's own; everything else is a config override.
    own, rest, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a in ("-c", "--config"):
            own += argv[i:i + 2]
            i += 2
            continue
        if a.startswith("--config=") or a in ("--print-config", "-h", "--help"):
            own.append(a)
            i += 1
            continue
        rest.append(a)
        i += 1
    args = parser.parse_args(own + _normalise_argv(rest))
    try:
        cfg = load_config(defaults, args.config, args.overrides)
    except ConfigError as e:
        parser.error(str(e))
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        raise SystemExit(0)
    return cfg, args


def save_config(cfg: Mapping, out_dir: str, name: str = "config.yaml") -> str:
    """Write the resolved config next to the outputs (atomically) and return its path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    data = cfg.to_dict() if isinstance(cfg, Config) else dict(cfg)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    os.replace(tmp, path)
    return path

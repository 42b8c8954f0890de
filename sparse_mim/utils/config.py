"""One config object per run: schema defaults <- YAML recipe (with ``_base_`` inheritance) <- command line.

Why this shape (timm / MAE house style, mmengine-style ``_base_``): the defaults live in code next
to the function that uses them, each key with its meaning and its allowed range (``K``); a YAML file
in ``configs/`` sets a recipe and may inherit another (``_base_: base.yaml``) so a recipe holds only
what differs; any key can still be changed on the command line as ``optim.lr=1e-3`` (or
``--optim.lr 1e-3``). Every value is checked against the type of its default and against its range
when the config is loaded, so a typo or an impossible value fails at start-up with one line naming
the key, the value and what is allowed, not hours later inside a training step. The resolved config
is written as ``config.yaml`` next to the outputs so a run can be reproduced exactly.

We keep this small loader rather than OmegaConf: it gives typed, range-checked keys with
did-you-mean errors and per-key help in ~400 lines, and the resolved config stays a plain dict
(safe to store in a ``weights_only`` checkpoint and in wandb).
"""
from __future__ import annotations

import argparse
import copy
import difflib
import math
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import yaml

__all__ = [
    "Config", "ConfigError", "K", "load_config", "parse_config", "apply_overrides", "merge_config",
    "save_config", "flatten", "config_arg_parser", "config_help", "split_schema", "schema_defaults",
    "resolve_recipe", "shipped_recipes_dir", "split_argv", "safe_yaml", "read_text_file", "short_repr",
    "RECIPE_MAX_BYTES",
]


class ConfigError(ValueError):
    """A config file or override that does not fit the schema (the message says how to fix it)."""


_UNSET = object()


class K:
    """One config key in a schema: its default, a one-line meaning and the values it allows.

    ``choices``: allowed values; ``min`` / ``max``: inclusive bounds, ``gt`` / ``lt``: exclusive
    bounds (numbers, or every item of a list); ``length``: exact list length; ``item_*``: bounds
    applied to each list item only; ``nullable``: ``None`` is allowed; ``check``: a function of the
    value returning an error text (what is allowed) or ``None``.
    """

    __slots__ = ("default", "help", "choices", "min", "max", "gt", "lt", "length", "item_min", "item_max",
                 "item_gt", "item_lt", "nullable", "check")

    def __init__(self, default: Any, help: str = "", *, choices: Sequence | None = None, min: float | None = None,
                 max: float | None = None, gt: float | None = None, lt: float | None = None,
                 length: int | None = None, item_min: float | None = None, item_max: float | None = None,
                 item_gt: float | None = None, item_lt: float | None = None, nullable: bool = False,
                 check: Callable[[Any], str | None] | None = None):
        self.default, self.help = default, help
        self.choices = tuple(choices) if choices is not None else None
        self.min, self.max, self.gt, self.lt, self.length = min, max, gt, lt, length
        self.item_min, self.item_max, self.item_gt, self.item_lt = item_min, item_max, item_gt, item_lt
        self.nullable = nullable or default is None
        self.check = check

    def __repr__(self) -> str:
        return f"K({self.default!r}, {self.help!r})"

    @staticmethod
    def _bounds(lo, hi, gt, lt) -> list[str]:
        out = []
        if gt is not None:
            out.append(f"> {gt:g}")
        if lo is not None:
            out.append(f">= {lo:g}")
        if lt is not None:
            out.append(f"< {lt:g}")
        if hi is not None:
            out.append(f"<= {hi:g}")
        return out

    def allowed(self) -> str:
        """Human text of what the key allows ("" when anything of the default's type goes)."""
        parts = []
        if self.choices is not None:
            parts.append("one of " + " | ".join(str(c) for c in self.choices))
        parts += self._bounds(self.min, self.max, self.gt, self.lt)
        if self.length is not None:
            parts.append(f"a list of {self.length}")
        item = self._bounds(self.item_min, self.item_max, self.item_gt, self.item_lt)
        if item:
            parts.append("each item " + " and ".join(item))
        if self.nullable and self.default is not None:
            parts.append("or null")
        return ", ".join(parts)

    @staticmethod
    def _out_of(v, lo, hi, gt, lt) -> bool:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            return False
        if isinstance(v, float) and math.isnan(v):
            return True
        return ((lo is not None and v < lo) or (hi is not None and v > hi) or (gt is not None and v <= gt)
                or (lt is not None and v >= lt))

    def validate(self, value: Any) -> str | None:
        """Return what is wrong with ``value`` (as "expected ...") or None."""
        if value is None:
            return None if self.nullable else f"expected {self.allowed() or 'a value'}, got null"
        bad = False
        if self.choices is not None and value not in self.choices:
            bad = True
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(self._out_of(v, self.min, self.max, self.gt, self.lt) for v in values):
            bad = True
        if isinstance(value, (list, tuple)):
            if self.length is not None and len(value) != self.length:
                bad = True
            if any(self._out_of(v, self.item_min, self.item_max, self.item_gt, self.item_lt) for v in value):
                bad = True
        if bad:
            return f"expected {self.allowed()}"
        if self.check is not None:
            return self.check(value)
        return None


def split_schema(schema: Mapping, prefix: str = "") -> tuple[dict, dict[str, K]]:
    """``(plain default values, {dotted key: K})`` from a schema whose leaves are values or ``K``."""
    values, specs = {}, {}
    for k, v in schema.items():
        key = f"{prefix}{k}"
        if isinstance(v, K):
            values[k] = copy.deepcopy(v.default)
            specs[key] = v
        elif isinstance(v, Mapping) and len(v) > 0:
            values[k], sub = split_schema(v, key + ".")
            specs.update(sub)
        else:
            values[k] = copy.deepcopy(v)
            specs[key] = K(v)
    return values, specs


def schema_defaults(schema: Mapping) -> "Config":
    """The plain default values of a schema, as a Config."""
    return Config(split_schema(schema)[0])


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
    return ConfigError(f"unknown config key {short_repr(key, 80)} (from {source}).{hint} Valid keys: see --help "
                       f"({len(valid)} keys: {', '.join(valid[:6])}{', ...' if len(valid) > 6 else ''})")


RECIPE_MAX_BYTES = 1 << 20     # a recipe is a few KB; anything near this is not a recipe
YAML_MAX_NODES_PER_BYTE = 16   # alias expansion allowed: values per byte of YAML (plus a floor)
YAML_MIN_NODE_BUDGET = 10_000


def short_repr(value: Any, limit: int = 160) -> str:
    """``repr`` bounded in work and length (nested / aliased values of hostile files stay cheap)."""
    import reprlib
    r = reprlib.Repr()
    r.maxlevel, r.maxdict, r.maxlist, r.maxtuple, r.maxset, r.maxstring, r.maxother = 3, 6, 8, 8, 8, limit, limit
    text = r.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys (naming both lines)."""

    source = "<yaml>"

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                    seen.setdefault(key, line)
                except TypeError:
                    continue
                if first is not None:
                    where = f"lines {first} and {line}" if first != line else f"line {line}, twice"
                    raise ConfigError(f"{self.source}: key {short_repr(key, 60)} appears twice ({where}); "
                                      "keep one of them")
        return super().construct_mapping(node, deep)


def _expanded_size(node, budget: int, source: str) -> int:
    """Values the node stands for once YAML aliases are expanded (shared nodes counted at each use);
    raises once ``budget`` is passed or an alias refers to itself."""
    memo: dict[int, int] = {}
    active: set[int] = set()

    def size(n) -> int:
        key = id(n)
        if key in memo:
            return memo[key]
        if key in active:
            raise ConfigError(f"{source}: a YAML alias refers to its own anchor (a recursive value); "
                              "write the value out")
        active.add(key)
        total = 1
        if isinstance(n, yaml.SequenceNode):
            for child in n.value:
                total += size(child)
                if total > budget:
                    break
        elif isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                total += size(k) + size(v)
                if total > budget:
                    break
        active.discard(key)
        memo[key] = total
        if total > budget:
            raise ConfigError(f"{source}: its YAML aliases expand to more than {budget} values (from "
                              "anchors used over and over: an alias bomb?); write the values out or use fewer "
                              "aliases")
        return total
    return size(node)


def safe_yaml(text: str, source: str) -> Any:
    """Parse YAML text safely and boundedly: no Python objects, duplicate keys refused, alias expansion
    bounded by the text's size. Errors (``ConfigError``) name ``source``."""
    loader = _RecipeLoader(text)
    loader.source = source
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, max(YAML_MIN_NODE_BUDGET, YAML_MAX_NODES_PER_BYTE * len(text)), source)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_text_file(path: str, what: str = "file", max_bytes: int | None = None,
                   error: type = ConfigError) -> str:
    """A text file's contents as UTF-8 (a BOM, as Excel writes, is dropped): a file above ``max_bytes`` or with
    bytes that are not UTF-8 is refused (``error``, one line naming the file, the offset of the bad byte and
    how to fix it)."""
    size = os.path.getsize(path)
    if max_bytes is not None and size > max_bytes:
        raise error(f"{what} {path!r} is {size / 2**20:.1f} MiB, above the {max_bytes / 2**20:g} MiB a "
                          f"{what} may have; is it the right file?")
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1 if max_bytes is not None else -1)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise error(f"{what} {path!r} is not UTF-8 text: byte {data[e.start:e.start + 1]!r} at offset "
                          f"{e.start} (line {line}); save it as UTF-8") from None


_TRUE = {"true", "yes", "on", "1", "y"}
_FALSE = {"false", "no", "off", "0", "n"}


def _coerce(key: str, value: Any, default: Any, source: str) -> Any:
    """Return ``value`` converted to the type of ``default`` or raise a ConfigError.

    Strings (from the command line) are parsed as YAML scalars first, so ``lr=1e-3``,
    ``size=[224,192]`` and ``name=null`` work. A default of None accepts anything.
    """
    if isinstance(value, str) and not isinstance(default, str):
        try:
            value = safe_yaml(value, f"{key} (from {source})") if value.strip() != "" else None
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}={short_repr(value)} (from {source}) is not a valid value: {e}") from None
    if default is None or value is None:
        return value
    expected = type(default)
    what = f"{key}={short_repr(value)} (from {source})"
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
            # a scalar where a list is the default (e.g. img_size=224 for [224, 224]) stays a scalar;
            # keys that accept both say so in their help.
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


def _lookup(tree: Mapping | None, dotted: str, default: Any = _UNSET) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def _set_dotted(cfg: Config, dotted: str, value: Any, source: str, reference: Mapping | None = None,
                sources: dict | None = None) -> None:
    """Set ``cfg[a][b] = value`` for ``dotted == "a.b"``, typed like ``reference`` (the code defaults)."""
    parts = dotted.split(".")
    node = cfg
    for i, part in enumerate(parts):
        if not isinstance(node, Mapping) or part not in node:
            raise _unknown_key_error(dotted, flatten(reference if reference is not None else cfg).keys(), source)
        if i == len(parts) - 1:
            ref_value = _lookup(reference, dotted, node[part]) if reference is not None else node[part]
            node[part] = _coerce(dotted, value, ref_value, source)
            if sources is not None:
                sources[dotted] = source
        else:
            node = node[part]


def merge_config(cfg: Config, update: Mapping, source: str = "config file", prefix: str = "",
                 reference: Mapping | None = None, sources: dict | None = None) -> Config:
    """Merge a (nested) mapping into ``cfg`` in place, checking every key, and types against ``reference``.

    A section whose default is empty (free-form, e.g. ``model.kwargs``) is replaced as a whole.
    """
    for k, v in update.items():
        dotted = f"{prefix}{k}"
        if isinstance(v, Mapping):
            ref_node = _lookup(reference, dotted) if reference is not None else _lookup(cfg, dotted)
            if ref_node is _UNSET:
                raise _unknown_key_error(dotted, flatten(reference if reference is not None else cfg).keys(),
                                         source)
            if isinstance(ref_node, Mapping) and len(ref_node) > 0:
                merge_config(cfg, v, source, dotted + ".", reference, sources)
                continue
        _set_dotted(cfg, dotted, v, source, reference, sources)
    return cfg


def apply_overrides(cfg: Config, overrides: Sequence[str], reference: Mapping | None = None,
                    sources: dict | None = None) -> Config:
    """Apply ``key.sub=value`` strings in place (values parsed as YAML, then type-checked)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"cannot read command-line argument {item!r}: write overrides as key=value "
                f"(e.g. optim.lr=1e-3) or --key value")
        key, value = item.split("=", 1)
        key = key.strip().lstrip("-").replace("-", "_")
        _set_dotted(cfg, key, value, "command line", reference, sources)
    return cfg


def read_recipe(path: str, _chain: tuple = ()) -> list[tuple[str, dict]]:
    """The YAML recipe ``path`` and its ``_base_`` files, as ``[(path, mapping), ...]`` base first.

    ``_base_`` is a path relative to the file (or a list of them, applied in order); bases may have
    bases. Later entries override earlier ones key by key.
    """
    path = os.path.normpath(path)
    if path in _chain:
        raise ConfigError(f"config file {path!r} inherits itself through _base_: {' -> '.join(_chain + (path,))}")
    if os.path.isdir(path):
        raise ConfigError(f"config file {path!r} is a directory; pass a YAML file with -c/--config")
    if not os.path.isfile(path):
        where = f" (a _base_ of {_chain[-1]!r})" if _chain else ""
        raise ConfigError(f"config file {path!r}{where} not found; pass an existing YAML file with -c/--config")
    text = read_text_file(path, "config file", RECIPE_MAX_BYTES)
    try:
        data = safe_yaml(text, f"config file {path!r}") or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {path!r} must hold a mapping of keys to values")
    data = dict(data)
    bases = data.pop("_base_", None) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"config file {path!r}: _base_ must be a file path or a list of paths")
    out: list[tuple[str, dict]] = []
    for base in bases:
        out += read_recipe(os.path.join(os.path.dirname(path), base), _chain + (path,))
    out.append((path, data))
    return out


def shipped_recipes_dir() -> str | None:
    """The folder of the shipped recipes: ``configs/`` of a source checkout, else the installed copy."""
    checkout = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")
    if os.path.isdir(checkout):
        return checkout
    # installed: package data next to this package (sparse_mim/recipes has no __init__.py, so it is
    # found through its parent package, a regular one on the file system)
    installed = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")
    return installed if os.path.isdir(installed) else None


def resolve_recipe(name: str) -> str:
    """A recipe path as given, or a shipped recipe by name (``fgvc/cub_metaformer0_224[.yaml]``,
    ``configs/pretrain/resnet50.yaml``), so ``-c`` works the same from a checkout and an installed package."""
    if os.path.exists(name):
        return name
    root = shipped_recipes_dir()
    if root is not None:
        rel = name[len("configs/"):] if name.startswith("configs/") else name
        for candidate in (rel, rel + ".yaml"):
            path = os.path.join(root, candidate)
            if os.path.isfile(path):
                return path
    return name


def _validate(cfg: Config, specs: Mapping[str, K], sources: Mapping[str, str]) -> None:
    flat = flatten(cfg)
    for key, spec in specs.items():
        value = flat.get(key, _lookup(cfg, key))
        if value is _UNSET:
            continue
        error = spec.validate(value)
        if error:
            source = sources.get(key, "default")
            raise ConfigError(f"{key}={short_repr(value)} (from {source}): {error}")


def load_config(defaults: Mapping, config_file: str | None = None, overrides: Sequence[str] = (),
                validate: Callable[[Config], None] | None = None) -> Config:
    """schema ``defaults`` <- YAML ``config_file`` (and its ``_base_`` files) <- ``overrides``.

    Returns a new Config of plain values. Types are checked against the code defaults and every
    ``K`` range / choice is checked once everything is merged; ``validate(cfg)`` may add cross-key
    checks (raise ConfigError). Errors name the key, the value, where it came from and what is allowed.
    """
    values, specs = split_schema(defaults)
    cfg = Config(copy.deepcopy(values))
    reference = copy.deepcopy(values)  # types are checked against the code defaults
    sources: dict[str, str] = {}
    if config_file:
        for path, data in read_recipe(resolve_recipe(config_file)):
            merge_config(cfg, data, source=path, reference=reference, sources=sources)
    apply_overrides(cfg, overrides, reference, sources)
    _validate(cfg, specs, sources)
    if validate is not None:
        validate(cfg)
    return cfg


def _format_default(v: Any) -> str:
    if v == "" or v is None:
        return '""' if v == "" else "null"
    return yaml.safe_dump(v, default_flow_style=True, width=1 << 20).strip().removesuffix("...").strip()


def config_help(defaults: Mapping) -> str:
    """Every key of a schema with its default, meaning and allowed values, one per line."""
    _, specs = split_schema(defaults)
    rows = [(key, _format_default(spec.default), spec.help, spec.allowed()) for key, spec in specs.items()]
    width = min(max((len(k) + len(d) + 3 for k, d, _, _ in rows), default=0), 48)
    lines, section = [], None
    for key, default, text, allowed in rows:
        top = key.split(".")[0] if "." in key else ""
        if top != section:
            section = top
            lines.append(f"  [{top}]" if top else "  [top level]")
        left = f"{key} = {default}"
        meaning = text + (f" ({allowed})" if allowed else "")
        lines.append(f"    {left:<{width}} {meaning}".rstrip())
    return "\n".join(lines)


def config_arg_parser(description: str | None = None, epilog: str | None = None,
                      prog: str | None = None) -> argparse.ArgumentParser:
    """The command line every tool shares: ``[-c CONFIG.yaml] [key=value ...]`` plus the tool's own arguments."""
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", default=None, help="YAML recipe (may inherit others with _base_)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def split_argv(argv: Sequence[str], config_keys: Iterable[str]) -> tuple[list[str], list[str]]:
    """Separate a tool's own arguments from config overrides.

    Overrides are ``key=value``, ``--key=value``, ``--key value`` and bare ``--flag`` (``=true``) where
    the key is dotted or a known config key; everything else is the tool's own (``-c``, positionals).
    """
    keys = set(config_keys)
    tops = {k.split(".")[0] for k in keys}
    own, overrides, i = [], [], 0
    argv = list(argv)
    while i < len(argv):
        a = argv[i]
        if not a.startswith("-") and "=" in a:
            overrides.append(a)
        elif a.startswith("--") and len(a) > 2:
            name = a[2:].split("=", 1)[0].replace("-", "_")
            if "." in name or name in keys or name in tops:
                if "=" in a:
                    overrides.append(a[2:])
                elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                    overrides.append(f"{a[2:]}={argv[i + 1]}")
                    i += 1
                else:
                    overrides.append(f"{a[2:]}=true")  # bare flag: a boolean switch
            else:
                own.append(a)
        else:
            own.append(a)
        i += 1
    return own, overrides


def parse_config(defaults: Mapping, argv: Sequence[str] | None = None, description: str | None = None,
                 epilog: str | None = None, parser: argparse.ArgumentParser | None = None,
                 validate: Callable[[Config], None] | None = None) -> tuple[Config, argparse.Namespace]:
    """Parse ``argv`` (default ``sys.argv[1:]``) into a resolved Config and the tool's own arguments.

    ``parser`` (from :func:`config_arg_parser`, with the tool's own arguments added) is used when
    given. ``--help`` lists every config key with its default and meaning. A bad key or value
    raises ConfigError (the CLI wrapper prints it as one line).
    """
    import sys
    argv = list(sys.argv[1:] if argv is None else argv)
    keys_help = "config keys (in the YAML recipe or as key=value / --key value):\n" + config_help(defaults)
    if parser is None:
        parser = config_arg_parser(description, epilog)
    parser.epilog = (parser.epilog + "\n\n" if parser.epilog else "") + keys_help
    values, _ = split_schema(defaults)
    own, overrides = split_argv(argv, flatten(values).keys())
    args = parser.parse_args(own)
    cfg = load_config(defaults, getattr(args, "config", None), overrides, validate=validate)
    args.overrides = overrides
    if getattr(args, "print_config", False):
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        raise SystemExit(0)
    return cfg, args


def save_config(cfg: Mapping, out_dir: str, name: str = "config.yaml") -> str:
    """Write the resolved config next to the outputs (atomically) and return its path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    data = cfg.to_dict() if isinstance(cfg, Config) else dict(cfg)
    text = yaml.safe_dump(data, sort_keys=False)
    from .checkpoint import atomic_write_text  # temp file + fsync + rename; a full disk leaves nothing behind
    return atomic_write_text(path, text)

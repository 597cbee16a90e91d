"""The search space: the YAML file (default: space.yaml beside this module) read into Ray Tune domains,
every entry validated against the sweep's base config before Ray starts."""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import yaml
from ray import tune

from stt.cli import UsageError
from stt.config import Config, apply_overrides, from_dict, to_dict, validate

SPACE_FILE = Path(__file__).with_name("space.yaml")
DISTRIBUTIONS = {"loguniform": tune.loguniform, "uniform": tune.uniform, "choice": tune.choice, "randint": tune.randint}
EXAMPLES = {"loguniform": "[0.01, 1]", "uniform": "[0.1, 1]", "choice": "[a, b]", "randint": "[1, 10]"}


def load_space(path: Path, base: Config | None = None) -> dict[str, dict[str, object]]:
    """The YAML search space as Ray Tune domains: {"training": {key: domain}, "propagation": {...}}.

    Every entry is checked before Ray starts, against `base` (the sweep's base config; default: the
    defaults): the distribution and its arguments, and each value it can produce (each choice, both
    ends of a range) applied to a copy of `base` and validated as a config would be (stt.config.validate).
    A UsageError names the file, the entry and what was expected.
    """
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise UsageError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None
    if not isinstance(spec, dict) or set(spec) - {"training", "propagation"}:
        raise UsageError(f"{path}: expected sections 'training' and/or 'propagation', got {list(spec or {})}")
    base = with_params(base or Config(), {})
    space: dict[str, dict[str, object]] = {"training": {}, "propagation": {}}
    for section, entries in spec.items():
        if not isinstance(entries or {}, dict):
            raise UsageError(f"{path}: {section}: expected a mapping of config keys to distributions, got {entries!r}")
        for key, distribution in (entries or {}).items():
            space[section][key] = space_entry(path, section, str(key), distribution, base)
    return space


def space_entry(path: Path, section: str, key: str, distribution, base: Config):
    """One search-space entry as a Ray Tune domain, or a UsageError naming `path`, the entry and what was expected."""
    where = f"{path}: {section}.{key}"
    if section == "propagation" and not key.startswith("propagation."):
        raise UsageError(f"{where}: the propagation section samples propagation.* keys only (propagation trials reuse "
                         "one checkpoint's features); move it under 'training'")
    if section == "training" and key.startswith("propagation."):
        raise UsageError(f"{where}: propagation.* keys belong under 'propagation' (searched on the cached features)")
    if not isinstance(distribution, dict) or len(distribution) != 1 or next(iter(distribution)) not in DISTRIBUTIONS:
        raise UsageError(f"{where}: expected one of {sorted(DISTRIBUTIONS)} with its arguments, e.g. "
                         f"{{uniform: [0.1, 1]}}, got {distribution!r}")
    (kind, arguments), = distribution.items()
    described = f"{kind} {arguments!r}"
    values = produced_values(where, described, kind, arguments, field_type(base, key), key)
    for value in values:  # each value the entry can produce (a range by its ends), applied as a trial would
        try:
            validate(with_params(base, {key: value}))
        except UsageError as error:
            raise UsageError(f"{where}: {described}: {str(error).removeprefix(f'{key}: ')}") from None
    return DISTRIBUTIONS[kind](arguments) if kind == "choice" else DISTRIBUTIONS[kind](*arguments)


def produced_values(where: str, described: str, kind: str, arguments, declared: type | None, key: str) -> list:
    """The values a distribution's arguments can produce that bound it (each choice; a range's two ends),
    or a UsageError naming the entry (`where`) and what was expected."""
    if not isinstance(arguments, list):
        raise UsageError(f"{where}: {described}: expected a list of arguments, e.g. {{{kind}: {EXAMPLES[kind]}}}")
    if kind == "choice":
        if not arguments:
            raise UsageError(f"{where}: {described}: expected at least one value to choose from")
        return arguments
    if len(arguments) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in arguments):
        raise UsageError(f"{where}: {described}: expected [low, high], two numbers")
    low, high = arguments
    if kind == "randint":
        if not all(isinstance(a, int) for a in arguments):
            raise UsageError(f"{where}: {described}: expected two integers [low, high_exclusive]")
        if low >= high:
            raise UsageError(f"{where}: {described}: expected low < high (high is exclusive: [{low}, {low + 1}] "
                             f"samples {low} only), got an empty range")
        return [low, high - 1]
    if low >= high:
        raise UsageError(f"{where}: {described}: expected low < high")
    if kind == "loguniform" and low <= 0:
        raise UsageError(f"{where}: {described}: expected 0 < low < high (a log scale has no zero or negative values)")
    if declared is int:
        raise UsageError(f"{where}: {described}: {key} is an integer: expected randint or choice, not {kind}")
    return [low, high]


def field_type(cfg: Config, key: str):
    """The declared type of the config field `key` (Optional[X] as X), or None for an unknown key."""
    node, parts = cfg, key.split(".")
    for part in parts[:-1]:
        node = getattr(node, part, None)
        if not dataclasses.is_dataclass(node):
            return None
    annotation = typing.get_type_hints(type(node)).get(parts[-1])
    options = [a for a in typing.get_args(annotation) if a is not type(None)]
    return options[0] if len(options) == 1 else annotation


def in_domain(domain, value) -> bool:
    """Whether a Ray Tune domain (choice, uniform, loguniform, randint) can produce `value`."""
    if isinstance(domain, tune.search.sample.Categorical):
        return value in domain.categories
    if isinstance(domain, tune.search.sample.Float):
        return domain.lower <= value <= domain.upper
    return domain.lower <= value < domain.upper


def with_params(base: Config | dict, params: dict) -> Config:
    """A new Config: `base` (a Config or its `to_dict`) with `params` ({dotted key: value}) applied as overrides."""
    cfg = from_dict(to_dict(base) if isinstance(base, Config) else base)
    return apply_overrides(cfg, [f"{key}={value}" for key, value in params.items()])

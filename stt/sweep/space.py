"""The search space: the YAML file (default: space.yaml beside this module) read into Ray Tune domains for
the stage the sweep tunes (the last of `train.recipe`), every entry validated against the sweep's base config
before Ray starts."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from pathlib import Path

import yaml
from ray import tune

from stt.config import Config, PropagationConfig, from_dict, set_values, validate
from stt.errors import UsageError
from stt.propagation.per_frame import PerFrameSpace
from stt.recipes import StageSpec, recipe_of, stage_spec

SPACE_FILE = Path(__file__).with_name("space.yaml")
DISTRIBUTIONS = {"loguniform": tune.loguniform, "uniform": tune.uniform, "choice": tune.choice, "randint": tune.randint}
EXAMPLES = {"loguniform": "[0.01, 1]", "uniform": "[0.1, 1]", "choice": "[a, b]", "randint": "[1, 10]"}

# The stages a sweep can tune (the last of `train.recipe`), and for each the features that add a group of training
# entries, `STAGE+FEATURE`, when the stage's spec has them. A group's entries should not change the feature itself.
FEATURES: dict[str, dict[str, Callable[[StageSpec], bool]]] = {
    "temporal": {"teacher": lambda spec: spec.teacher, "lwf": lambda spec: spec.lwf, "ewc": lambda spec: spec.ewc},
    "vfs": {
        "negatives": lambda spec: spec.config.vfs.negatives,
        "continuous": lambda spec: spec.config.vfs.sampling == "continuous",
    },
}
GROUPS = tuple(group for stage, features in FEATURES.items() for group in (stage, *(f"{stage}+{f}" for f in features)))


def tuned_stage(cfg: Config) -> str:
    """The stage the training trials tune: the last of `cfg.train.recipe`, or a UsageError saying why it cannot be."""
    stages = recipe_of(cfg).stages
    if stages[-1] not in FEATURES:
        raise UsageError(
            f"train.recipe={cfg.train.recipe}: the sweep tunes a recipe's last stage, which must be "
            f"one of {', '.join(FEATURES)} (the stages its search space has groups for); this recipe "
            f"ends with the {stages[-1]} stage"
        )
    return stages[-1]


def training_groups(spec: StageSpec) -> tuple[str, ...]:
    """The groups of the space's `training` section that apply to the stage `spec`: its own, then one per feature."""
    return (spec.name, *(f"{spec.name}+{name}" for name, has in FEATURES[spec.name].items() if has(spec)))


def load_space(path: Path, base: Config | None = None) -> dict[str, dict[str, object]]:
    """The YAML search space as Ray Tune domains for `base`'s recipe: {"training": {key: domain}, "propagation": {...}}.

    "training" holds the entries of the groups that apply to the recipe's last stage (`training_groups`).
    Every entry of every group is checked before Ray starts, against `base` (the sweep's base config; default:
    the defaults): the distribution and its arguments, and each value it can produce (each choice, both ends
    of a range) applied to a copy of `base` and validated as a config would be (stt.config.validate).
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
    stage_groups = mapping(path, "training", spec.get("training"), "stage groups to entries")
    groups = {f"training.{group}": entries for group, entries in stage_groups.items()}
    for group in groups:
        if group.removeprefix("training.") not in GROUPS:
            raise UsageError(
                f"{path}: {group}: expected groups of entries named after the stage they tune, one of "
                f"{', '.join(GROUPS)} (see the default space file, {SPACE_FILE.name})"
            )
    domains = {
        group: {
            str(key): space_entry(path, group, str(key), distribution, base)
            for key, distribution in mapping(path, group, entries).items()
        }
        for group, entries in {**groups, "propagation": spec.get("propagation")}.items()
    }
    applied = [f"training.{group}" for group in training_groups(stage_spec(base, tuned_stage(base)))]
    training: dict[str, object] = {}
    for group in applied:
        for key, domain in domains.get(group, {}).items():
            if key in training:
                raise UsageError(
                    f"{path}: {group}: {key}: also in another group that applies to "
                    f"train.recipe={base.train.recipe}; sample each key in one group"
                )
            training[key] = domain
    return {"training": training, "propagation": domains["propagation"]}


def mapping(path: Path, where: str, entries, of: str = "config keys to distributions") -> dict:
    """A section or group of the space file as a mapping (empty if absent), or a UsageError naming it."""
    if not isinstance(entries or {}, dict):
        raise UsageError(f"{path}: {where}: expected a mapping of {of}, got {entries!r}")
    return entries or {}


def space_entry(path: Path, group: str, key: str, distribution, base: Config):
    """One search-space entry of `group` ("propagation", or "training.STAGE[+FEATURE]") as a Ray Tune domain, or a
    UsageError naming `path`, the entry and what was expected."""
    where = f"{path}: {group}: {key}"
    if group == "propagation" and not key.startswith("propagation."):
        raise UsageError(
            f"{where}: the propagation section samples propagation.* keys only (propagation trials reuse "
            "one checkpoint's features); move it under 'training'"
        )
    if group != "propagation" and key.startswith("propagation."):
        raise UsageError(f"{where}: propagation.* keys belong under 'propagation' (searched on the cached features)")
    if not isinstance(distribution, dict) or len(distribution) != 1 or next(iter(distribution)) not in DISTRIBUTIONS:
        raise UsageError(
            f"{where}: expected one of {sorted(DISTRIBUTIONS)} with its arguments, e.g. "
            f"{{uniform: [0.1, 1]}}, got {distribution!r}"
        )
    ((kind, arguments),) = distribution.items()
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
            raise UsageError(
                f"{where}: {described}: expected low < high (high is exclusive: [{low}, {low + 1}] "
                f"samples {low} only), got an empty range"
            )
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


def starting_point(space: dict, base: PropagationConfig) -> list[dict] | None:
    """`base` as the propagation search's first trial, [{key: value}] over the space's keys, where the space can
    produce it (each value as the space's own choice gives it); else None.

    base: the trials' base propagation with its radius resolved (stt.propagation.for_task). Its unresolved None
    stands for the task's radius and is no listed radius, so with it the defaults were never tried.
    """
    if base.radius is None:
        raise ValueError("base.radius: resolve it with stt.propagation.for_task first")
    point = {}
    for key, domain in space.items():
        value = getattr(base, key.split(".", 1)[1])
        if not in_domain(domain, value):
            return None
        if isinstance(domain, tune.search.sample.Categorical):  # the choice itself: 12, not the resolved 12.0
            value = next(c for c in domain.categories if c == value)
        point[key] = value
    return [point]


def with_params(base: Config | dict, params: dict) -> Config:
    """A new Config: `base` (a Config or its `to_dict`) with `params` ({dotted key: value}, typed) set and validated."""
    return set_values(base if isinstance(base, Config) else from_dict(base), params)


# ---------------------------------------------------------------- what the propagation trials can ask for


def domain_values(domain, ranges: bool = True) -> list | None:
    """The values a Ray Tune domain (or a plain constant) can take, as far as its extremes go: a choice's
    categories, randint's [lower, upper - 1] (upper is exclusive), uniform's [lower, upper]; with
    ranges=False a continuous domain gives None (its values cannot be listed)."""
    if isinstance(domain, tune.search.sample.Categorical):
        return list(domain.categories)
    if isinstance(domain, tune.search.sample.Integer):
        return [domain.lower, domain.upper - 1]
    if isinstance(domain, tune.search.sample.Float) and ranges:
        return [domain.lower, domain.upper]
    if isinstance(domain, tune.search.sample.Domain) and not ranges:
        return None
    return [domain]


def superset_config(space: dict, base: PropagationConfig) -> PropagationConfig:
    """The widest propagation setting of a search space: the top-K graph built for it
    (stt.propagation.graph) serves every trial whose affinities it contains.

    space: {"propagation.KEY": Ray Tune domain or constant} (`load_space`'s "propagation" section; other
    keys are ignored). base: the configuration trials start from, radius resolved
    (stt.propagation.for_task). Widest: the largest context and top-k, the largest radius (0, no
    window, if the space holds it), a square window (it contains the circle of the same radius),
    the first frame unwindowed if any trial leaves it so. aggregation is "overall" (per-frame trials
    are refused by the graph's `serves`); normalize and any unknown field stay base's.
    """
    if base.radius is None:
        raise ValueError(
            "base.radius: None stands for the task's default; resolve it with stt.propagation.for_task first"
        )
    values = {field.name: [getattr(base, field.name)] for field in dataclasses.fields(PropagationConfig)}
    for key, domain in space.items():
        section, _, name = key.partition(".")
        if section == "propagation" and name in values:
            values[name] = domain_values(domain)
    radii = values["radius"]
    return dataclasses.replace(
        base,
        aggregation="overall",
        topk=max(values["topk"]),
        context=max(values["context"]),
        radius=0.0 if min(radii) <= 0 else float(max(radii)),
        window="square",
        window_first_frame=all(values["window_first_frame"]),
    )


def graph_lattice(space: dict, base: PropagationConfig) -> tuple[list[PropagationConfig], int] | None:
    """The sweep's top-K graphs as a lattice: one superset per (context, radius) pair of the space, narrowest first,
    and their K (the largest top-k); None when the space does not allow it (then one superset_config graph).

    A trial at a lattice point meets the graph built for exactly its context and radius: that graph's candidates are
    the trial's, so its top-K holds the trial's top-k and no target location falls back to the exact path (issue 25:
    at 480p one radius-35 superset left 9-70 % of them there). It needs context and radius searched over lists (a
    choice or a constant), every radius > 0, and window, window_first_frame and normalize not searched (each
    changes which cells are candidates). Memory: (contexts x radii) graphs of K each, against one of default_k.
    """

    def values(name: str) -> list | None:  # a choice's or a constant's values; None for a range (randint too)
        domain = space.get(f"propagation.{name}", getattr(base, name))
        if isinstance(domain, tune.search.sample.Domain) and not isinstance(domain, tune.search.sample.Categorical):
            return None
        return domain_values(domain)

    if base.radius is None:
        raise ValueError("base.radius: resolve it with stt.propagation.for_task first")
    contexts, radii = values("context"), values("radius")
    topks = domain_values(space.get("propagation.topk", base.topk))  # a randint's extremes will do
    if contexts is None or radii is None or min(radii) <= 0:
        return None
    if any(len(values(name) or [0, 1]) != 1 for name in ("window", "window_first_frame", "normalize")):
        return None
    widest = superset_config(space, base)
    lattice = [
        dataclasses.replace(widest, context=int(context), radius=float(radius), window=base.window)
        for context in sorted({int(c) for c in contexts})
        for radius in sorted({float(r) for r in radii})
    ]
    return lattice, int(max(topks))


def per_frame_space(space: dict, base: PropagationConfig) -> PerFrameSpace | str:
    """The per-frame settings a Ray Tune space's trials can take (stt.propagation.per_frame's store is built
    for exactly these), or why a store cannot serve them.

    space: {"propagation.KEY": Ray Tune domain or constant}; base: the trials' base configuration, radius resolved.
    Radius and temperature must be constants or choices (a store holds one stratum per radius and one normaliser
    per temperature); top-k and context are bounded by their largest value.
    """

    def values(name: str) -> list | None:
        return domain_values(space.get(f"propagation.{name}", getattr(base, name)), ranges=False)

    aggregations = values("aggregation") or []
    if "per-frame" not in aggregations:
        return "no per-frame trial in the space"
    radii, temperatures = values("radius"), values("temperature")
    if radii is None or temperatures is None:
        return "radius and temperature must be searched over lists (a stratum per radius, a normaliser per T)"
    if base.radius is None:
        raise ValueError("base.radius: resolve it with stt.propagation.for_task first")
    for name in ("window", "normalize"):
        if len(values(name) or [0, 1]) != 1:
            return f"{name} is searched: the store holds one"
    first = values("window_first_frame") or [True, False]
    strata = {float(r) for r in radii} | ({0.0} if False in first else set())
    return PerFrameSpace(
        radii=tuple(sorted(strata)),
        temperatures=tuple(sorted(float(t) for t in temperatures)),
        k=int(max(values("topk") or [base.topk])),
        context=int(max(values("context") or [base.context])),
        window=base.window,
        normalize=base.normalize,
        after_mask="after-mask" in (values("per_frame_norm") or ["after-mask"]),
    )

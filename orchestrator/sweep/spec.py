"""The sweep file: a base run config plus a search space over dotted keys, planned into trials.

    name: objectives-ablation
    base: ../quickstart.yaml            # a run config (relative to this file), or an inline mapping
    overrides: {train.log_every: 5}     # dotted overrides every trial shares
    objective_sets:                     # a grid dimension over `objectives`:
      mlm: [mlm]                        #   a list = weight 1.0 each
      mlm+itm: {mlm: 1.0, itm: 0.5}     #   a mapping = these weights
    space:                              # dotted key -> how its values are chosen
      moe.gate: [switch, gshard]                  # grid (also {grid: [...]}): every value
      deepspeed.zero_stage: {choice: [1, 2]}      # drawn once per sample
      train.lr: {loguniform: [1.0e-4, 1.0e-2]}    # drawn once per sample; also uniform, randint
      routing: {variants: {dense: {moe.num_experts: 0}, top2: {moe.gate: gshard}}}  # named bundles
    samples: 1                          # draws of the drawn dimensions
    seeds: 2                            # repeats of every point: train.seed = 0, 1 (or a list)
    metric: eval/i2t_r1
    mode: max
    budget: {steps: 200}                # or {tokens: 2.0e6}: per point, steps = tokens / tokens per step
    scheduler: {type: asha, grace_period: 50}     # optional early stopping
    max_concurrent: auto                # trials at once; auto = as the cluster's CPUs/GPUs allow
    out: sweeps                         # the sweep directory is <out>/<name>/
    pretrain: {config: ../pretrain.yaml}  # transfer sweeps: run this first; the trials fine-tune from it

A *point* is one configuration: the cross product of the grid dimensions (objective sets, grid,
variants), times `samples` draws of the drawn ones. Values are drawn here, once, with `space_seed`,
so every seed of a point trains the very same configuration and a resumed sweep draws nothing new.
A *trial* is a point at one seed: the base config + the point's overrides + the budget's steps +
train.seed, i.e. the same `--set` mechanism as `mmpt run`.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from jobs.config import RunConfig
from models import metric_keys as mk
from orchestrator.config import ConfigError, apply_overrides, load_raw, validate
from orchestrator.run.files import run_uri
from orchestrator.sweep.trial_metrics import metric_problem

_DRAWN = ("choice", "uniform", "loguniform", "randint")
PLAN_FILE = "sweep.yaml"  # the resolved plan, in the sweep directory
PRETRAIN_RUN = "pretrain"  # a transfer sweep's pretraining run: <sweep dir>/runs/pretrain


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Dimension(_Strict):
    """How one key's values are chosen: exactly one of the fields."""

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None
    variants: dict[str, dict[str, Any]] | None = None

    @model_validator(mode="before")
    @classmethod
    def _bare_list_is_grid(cls, v: Any) -> Any:
        return {"grid": v} if isinstance(v, list) else v

    @model_validator(mode="after")
    def _exactly_one(self) -> Dimension:
        given = [k for k in type(self).model_fields if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(type(self).model_fields)} (got {given or 'none'})")
        kind = given[0]
        value = getattr(self, kind)
        if kind in ("grid", "choice", "variants") and not value:
            raise ValueError(f"{kind} is empty; give at least one value")
        if kind in ("uniform", "loguniform", "randint") and not value[0] < value[1]:
            raise ValueError(f"{kind} = {list(value)}: needs [low, high] with low < high")
        if kind == "loguniform" and value[0] <= 0:
            raise ValueError(f"loguniform = {list(value)}: bounds must be > 0")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in type(self).model_fields if getattr(self, k) is not None)


class Budget(_Strict):
    steps: int | None = Field(None, ge=1, description="train.steps of every trial")
    tokens: float | None = Field(None, gt=0, description="sequence positions (text + visual tokens) per trial")

    @model_validator(mode="after")
    def _one(self) -> Budget:
        if (self.steps is None) == (self.tokens is None):
            raise ValueError("give exactly one of steps, tokens")
        return self


class AshaConfig(_Strict):
    """Asynchronous successive halving (Li et al. 2020): at step grace_period * rf^k, stop a trial
    unless it is in the top 1/rf of the trials that reached that step."""

    type: Literal["asha"] = "asha"
    grace_period: int | None = Field(None, ge=1, description="steps before a trial can be stopped; default budget/4")
    reduction_factor: float = Field(2.0, gt=1)
    brackets: int = Field(1, ge=1)


class PretrainSpec(_Strict):
    """A pretraining run the sweep runs first (skipped once finished); every trial fine-tunes from it
    (the base gets `finetune.from_run` = its run directory, `<sweep dir>/runs/pretrain`)."""

    config: str | dict[str, Any] = Field(description="run config file (relative to the sweep file) or mapping")
    overrides: dict[str, Any] = Field(default_factory=dict)


class SweepSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    pretrain: PretrainSpec | None = Field(None, description="transfer sweeps: the pretraining run the trials start from")
    base: str | dict[str, Any] = Field(description="run config file (relative to the sweep file) or mapping")
    overrides: dict[str, Any] = Field(default_factory=dict)
    objective_sets: dict[str, list[str] | dict[str, float]] = Field(default_factory=dict)
    space: dict[str, Dimension] = Field(default_factory=dict)
    samples: int = Field(1, ge=1)
    space_seed: int = 0
    seeds: int | list[int] = 1
    metric: str
    mode: Literal["min", "max"]
    budget: Budget | None = None
    scheduler: AshaConfig | None = None
    max_concurrent: int | Literal["auto"] = "auto"
    out: str = "sweeps"

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: int | list[int]) -> int | list[int]:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be >= 1 (repeats per point) or a list of seeds")
        if isinstance(v, list) and (not v or len(set(v)) != len(v)):
            raise ValueError("must be a non-empty list of distinct seeds")
        return v

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)


@dataclass
class Point:
    id: str  # p00, p01, ... in space order
    label: str  # "objectives=mlm+itm moe.gate=switch"
    overrides: dict[str, Any]
    steps: int = 0


@dataclass
class SweepPlan:
    """Everything a sweep needs to run, resume and be reported: saved as `<sweep dir>/sweep.yaml`."""

    name: str
    sweep_dir: str
    metric: str
    mode: str
    seeds: list[int]
    base: dict[str, Any]  # the raw run config every trial starts from (overrides applied)
    points: list[Point]
    spec: dict[str, Any]  # the sweep file as given (after --set), for the record
    warnings: list[str] = field(default_factory=list)
    pretrain: dict[str, Any] | None = None  # the raw run config of the pretraining run (transfer sweeps)

    def pretrain_config(self) -> RunConfig | None:
        return None if self.pretrain is None else validate(self.pretrain)

    def trial_name(self, point_id: str, seed: int) -> str:
        return f"{point_id}-s{seed}"

    def point(self, point_id: str) -> Point:
        return next(p for p in self.points if p.id == point_id)

    def trial_overrides(self, point_id: str, seed: int) -> dict[str, Any]:
        p = self.point(point_id)
        # Tracked trials are grouped under the sweep's name (orchestrator/tracking/sweep.py).
        tracking = self.base.get("tracking") or {}
        group = {"tracking.group": self.name} if tracking and not tracking.get("group") else {}
        # A seed varies the data order too, not only the init (data.shuffle_seed null = file order, kept).
        data = self.base.get("data") or {}
        order = {} if "shuffle_seed" in data and data["shuffle_seed"] is None else {"data.shuffle_seed": seed}
        return {**order, **p.overrides, "train.steps": p.steps, "train.seed": seed,
                "name": self.trial_name(point_id, seed), "storage.path": self.sweep_dir, **group}

    def trial_config(self, point_id: str, seed: int) -> RunConfig:
        return validate(apply_overrides(self.base, self.trial_overrides(point_id, seed)))

    @property
    def trials(self) -> list[tuple[str, int]]:
        return [(p.id, s) for p in self.points for s in self.seeds]

    def to_yaml(self) -> str:
        data = asdict(self)
        data.pop("warnings")
        return yaml.safe_dump(data, sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> SweepPlan:
        data = yaml.safe_load(text)
        data["points"] = [Point(**p) for p in data["points"]]
        return cls(**data)


def load_plan(sweep_dir: str | Path) -> SweepPlan:
    """The plan a sweep directory was started with (what `--resume` and `mmpt report` read)."""
    path = Path(sweep_dir, PLAN_FILE)
    if not path.is_file():
        raise ConfigError([f"{sweep_dir}: not a sweep directory (no {PLAN_FILE}; make one with: mmpt sweep SWEEP.yaml)"])
    return SweepPlan.from_yaml(path.read_text())


def load_spec(path: str | Path, overrides: list[str] | None = None) -> tuple[SweepSpec, Path]:
    """Read and validate a sweep file; `--set` overrides apply to it (`sweep.<key>=...`, e.g.
    sweep.seeds=3) or, for every other key, to the base run config (`train.batch_size=16`)."""
    raw = load_raw(path)
    sweep_sets = [o.removeprefix("sweep.") for o in overrides or [] if o.startswith("sweep.")]
    base_sets = [o for o in overrides or [] if not o.startswith("sweep.")]
    raw = apply_overrides(raw, sweep_sets)
    if base_sets:
        raw["overrides"] = {**(raw.get("overrides") or {}), **_pairs(base_sets)}
    try:
        return SweepSpec.model_validate(raw), Path(path).resolve().parent
    except ValidationError as exc:
        raise ConfigError(_errors(exc)) from None


def _pairs(items: list[str]) -> dict[str, Any]:
    from orchestrator.config import parse_override

    return dict(parse_override(i) for i in items)


def _format(err: Any) -> str:
    loc = [str(p) for p in err["loc"] if "[" not in str(p) and not str(p).startswith("function-")]
    where = ".".join(loc) or "sweep"
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown key; allowed keys here: {', '.join(_allowed(loc[:-1]))}"
    if err["type"] == "missing":
        return f"{where}: required"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{where}: {msg}" if isinstance(err["input"], dict) else f"{where} = {err['input']!r}: {msg}"


def _errors(exc: ValidationError) -> list[str]:
    """One line per location (a union reports one error per member; the first says enough)."""
    seen: dict[str, str] = {}
    for err in exc.errors():
        line = _format(err)
        seen.setdefault(line.split(":")[0].split(" = ")[0], line)
    return list(seen.values())


def _unwrap(ann: Any) -> Any:
    """The pydantic model inside `X | None`, else the annotation itself."""
    return next((a for a in getattr(ann, "__args__", ()) if hasattr(a, "model_fields")), ann)


def _allowed(loc: list[str]) -> list[str]:
    node: Any = SweepSpec
    for part in loc:
        fields = getattr(node, "model_fields", None)
        if fields is not None and part in fields:
            node = _unwrap(fields[part].annotation)
        elif get_origin(node) is dict:
            node = _unwrap(get_args(node)[1])  # `part` is a key of the mapping
    return sorted(getattr(node, "model_fields", {}))


def key_problem(key: str) -> str | None:
    """Why a dotted key names no field of the run config, or None (keys inside dicts are free)."""
    node: Any = RunConfig
    parts = key.split(".")
    for depth, part in enumerate(parts):
        fields = getattr(node, "model_fields", None)
        if fields is None:
            return None if _is_mapping(node) else f"{'.'.join(parts[:depth])} is a value, not a section"
        if part not in fields:
            where = ".".join(parts[:depth]) or "the run config"
            return f"unknown config key {part!r} in {where}; allowed: {', '.join(sorted(fields))}"
        ann = fields[part].annotation
        node = next((a for a in (*getattr(ann, "__args__", ()), ann) if hasattr(a, "model_fields")), ann)
    return None


def _is_mapping(ann: Any) -> bool:
    return getattr(ann, "__origin__", ann) is dict or any(_is_mapping(a) for a in getattr(ann, "__args__", ()))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return "+".join(map(str, value))
    return str(value)


def _objective_set(name: str, value: list[str] | dict[str, float]) -> dict[str, float]:
    weights = {n: 1.0 for n in value} if isinstance(value, list) else dict(value)
    from models import OBJECTIVES

    unknown = sorted(set(weights) - set(OBJECTIVES))
    if unknown:
        raise ConfigError([f"objective_sets.{name} = {value!r}: unknown objective(s) {', '.join(unknown)}; "
                           f"registered: {', '.join(sorted(OBJECTIVES))}"])
    if not weights:
        raise ConfigError([f"objective_sets.{name}: empty; list at least one objective"])
    return weights


def _grid_dims(spec: SweepSpec) -> list[list[tuple[str, dict[str, Any]]]]:
    """Each grid dimension as its (label part, overrides) choices."""
    dims: list[list[tuple[str, dict[str, Any]]]] = []
    if spec.objective_sets:
        dims.append([(f"objectives={name}", {"objectives": _objective_set(name, v)})
                     for name, v in spec.objective_sets.items()])
    for key, dim in spec.space.items():
        if dim.kind == "grid":
            dims.append([(f"{key}={_fmt(v)}", {key: v}) for v in dim.grid or []])
        elif dim.kind == "variants":
            dims.append([(f"{key}={name}", dict(ov)) for name, ov in (dim.variants or {}).items()])
    return dims


def _draw(dim: Dimension, rng: random.Random) -> Any:
    if dim.choice is not None:
        return rng.choice(dim.choice)
    if dim.uniform is not None:
        return rng.uniform(*dim.uniform)
    if dim.loguniform is not None:
        lo, hi = dim.loguniform
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))
    assert dim.randint is not None
    return rng.randint(*dim.randint)


def expand_points(spec: SweepSpec) -> list[Point]:
    """The sweep's configurations: grid cross product x `samples` draws of the drawn dimensions."""
    if not spec.objective_sets and not spec.space:
        raise ConfigError(["space: empty; give at least one dimension under space: or objective_sets:"])
    rng = random.Random(spec.space_seed)
    drawn = {k: d for k, d in spec.space.items() if d.kind in _DRAWN}
    points: list[Point] = []
    for combo in itertools.product(*_grid_dims(spec)):
        for _ in range(spec.samples if drawn else 1):
            labels = [label for label, _ in combo]
            overrides: dict[str, Any] = {}
            for _, ov in combo:
                overrides.update(ov)
            for key, dim in drawn.items():
                overrides[key] = _draw(dim, rng)
                labels.append(f"{key}={_fmt(overrides[key])}")
            points.append(Point(id=f"p{len(points):02d}", label=" ".join(labels), overrides=overrides))
    return points


def _key_problems(spec: SweepSpec) -> list[str]:
    keys = [("overrides", k) for k in spec.overrides]
    keys += [("space", k) for k, d in spec.space.items() if d.kind != "variants"]
    keys += [(f"space.{k}.variants.{n}", kk) for k, d in spec.space.items() if d.kind == "variants"
             for n, ov in (d.variants or {}).items() for kk in ov]
    return [f"{where}.{key}: {p}" for where, key in keys if (p := key_problem(key))]


def tokens_per_step(cfg: RunConfig) -> int:
    """Sequence positions one optimizer step processes over all workers: (text + visual tokens) x
    samples. Text counts its padded length, so the figure is the same for every caption mix."""
    from models.config import ImageSpec
    from models.factory import resolve, visual_tokens

    image = ImageSpec(size=cfg.data.image_size, max_objects=cfg.data.max_objects)
    per_sample = cfg.data.max_text_len + visual_tokens(cfg.model, resolve(cfg.model), image)
    return per_sample * cfg.train.batch_size * cfg.train.grad_accum * cfg.scaling.num_workers


def plan_sweep(spec: SweepSpec, spec_dir: Path, sweep_dir: Path | None = None) -> SweepPlan:
    """Resolve and check everything before any trial starts; ConfigError lists every problem."""
    problems = _key_problems(spec)
    if problems:
        raise ConfigError(problems)
    points = expand_points(spec)
    base = load_raw(spec_dir / spec.base) if isinstance(spec.base, str) else dict(spec.base)
    base = apply_overrides(base, spec.overrides)
    target = (sweep_dir or Path(spec.out) / spec.name).absolute()
    pretrain = None
    if spec.pretrain is not None:
        pre = spec.pretrain
        pretrain = load_raw(spec_dir / pre.config) if isinstance(pre.config, str) else dict(pre.config)
        pretrain = apply_overrides(pretrain, {**pre.overrides, "name": PRETRAIN_RUN, "storage.path": str(target)})
        try:
            validate(pretrain)
        except ConfigError as exc:
            raise ConfigError([f"pretrain: {q}" for q in exc.problems]) from None
        base = apply_overrides(base, {"finetune.from_run": run_uri(str(target), PRETRAIN_RUN)})
    plan = SweepPlan(name=spec.name, sweep_dir=str(target), metric=spec.metric, mode=spec.mode,
                     seeds=spec.seed_list, base=base, points=points, spec=spec.model_dump(mode="json"),
                     pretrain=pretrain)
    missing: list[str] = []
    for p in points:
        try:
            cfg = validate(apply_overrides(base, {**p.overrides, "storage.path": str(target)}))
            p.steps = spec.budget.steps if spec.budget and spec.budget.steps else cfg.train.steps
            if spec.budget and spec.budget.tokens:
                p.steps = max(1, math.ceil(spec.budget.tokens / tokens_per_step(cfg)))
            cfg = plan.trial_config(p.id, plan.seeds[0])
        except ConfigError as exc:
            problems += [f"point {p.id} ({p.label}): {q}" for q in exc.problems]
            continue
        why = metric_problem(spec.metric, cfg)
        if why:
            missing.append(f"{p.id} ({p.label}): {why}")
        elif spec.scheduler and spec.metric.startswith(mk.EVAL) and cfg.eval.every == 0:
            problems.append(f"scheduler = asha: metric {spec.metric!r} is only reported at the last step when "
                            f"eval.every is 0 (point {p.id}); set eval.every in the base, or rank by a loss/ metric")
    if problems:
        raise ConfigError(problems)
    if len(missing) == len(points):
        raise ConfigError([f"metric = {spec.metric!r}: no point of this sweep reports it: {missing[0]}"])
    plan.warnings = [f"metric {spec.metric!r} is not reported by point {m}" for m in missing]
    return plan

"""Which metric names a run reports, derived from its config and the objective registry.

A sweep names the metric it ranks trials by (`metric: eval/i2t_r1`); a metric that no trial can
report would leave the scheduler blind and the table empty, so the sweep checks it before any trial
starts. This module is the ONE place that knows where a name comes from. The rules, tried in order
(the first whose pattern matches decides):

    name                                        reported when
    step, lr, epoch, samples_seen,              always: every report of the train loop
      samples_per_s, tokens_per_s,
      step_time_s, data_wait_s, data_wait_share
    data/*, memory/*                            always (bad-data ledger, model-state probe)
    moe/*, loss/moe_*                           the model has MoE layers (moe.num_experts > 0)
    loss/total                                  always
    loss/<name>                                 objective <name> is active (weight > 0): an objective's
                                                loss term carries its registry name (`mlm` -> loss/mlm)
    eval/loss, eval/samples                     held-out data (data.eval) is set
    eval/(val|test)_*, eval/train_examples      a fine-tuning run (finetune:; jobs/transfer/finetune_loop.py)
    eval/zs_*, eval/probe_*                     held-out data (zero-shot / linear probe, jobs/transfer/zero_shot.py)
    eval/(i2t|t2i)_r<k>, eval/chance_r1,        held-out data and a retrieval scorer among the active
      eval/candidates                           objectives: ITM scores (itm) or ITC embeddings (itc),
                                                jobs/evaluate.py ranks candidates by them
    train/<m>, eval/<m>                         <m> names an active objective (`mlm_acc`, `itm_acc`,
                                                `grounded_mlm_acc`, `mrc_kl_acc`): an objective's metrics
                                                carry its name; eval/* also needs held-out data

Objective names come from `models.OBJECTIVES`, so an objective registered later is covered by the
`loss/<name>` and `<m>` rules without touching this file.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from jobs.config import RunConfig
from models import metric_keys as mk

# Objectives whose outputs rank retrieval candidates (jobs/evaluate.py), with what they score by.
RETRIEVAL_SCORERS: dict[str, str] = {"itm": "ITM scores", "itc": "ITC embeddings"}

_ALWAYS = ("step", "lr", "epoch", "samples_seen", "samples_per_s", "tokens_per_s", "step_time_s",
           "data_wait_s", "data_wait_share")


def _registered() -> list[str]:
    from models import OBJECTIVES  # torch import: only when a name is checked

    return sorted(OBJECTIVES)


def _objective_in(metric: str) -> str | None:
    """The registered objective a metric name mentions as whole `_`-separated words (the longest:
    `mrc_kl_acc` -> mrc_kl, not mrc), or None."""
    words = f"_{metric}_"
    found = [name for name in _registered() if f"_{name}_" in words]
    return max(found, key=len) if found else None


def _active(cfg: RunConfig) -> list[str]:
    return sorted(cfg.active_objectives)


def _needs_eval(cfg: RunConfig) -> str | None:
    return None if cfg.data.eval else "needs held-out data (data.eval is null)"


def _needs_moe(cfg: RunConfig, _m: re.Match[str]) -> str | None:
    return None if cfg.moe.enabled else "needs MoE layers (moe.num_experts is 0: a dense model)"


def _needs_objective(cfg: RunConfig, m: re.Match[str]) -> str | None:
    name = m.group("name")
    if name in cfg.active_objectives:
        return None
    where = "is not active" if name in _registered() else "is not a registered objective"
    return f"needs objective {name!r}, which {where} (active: {', '.join(_active(cfg))})"


def _needs_scorer(cfg: RunConfig, _m: re.Match[str]) -> str | None:
    scorers = [n for n in RETRIEVAL_SCORERS if n in cfg.active_objectives]
    if not scorers:
        need = " or ".join(f"{how} ({name})" for name, how in RETRIEVAL_SCORERS.items())
        return f"retrieval needs {need}; active objectives: {', '.join(_active(cfg))}"
    return _needs_eval(cfg)


def _needs_named_objective(cfg: RunConfig, m: re.Match[str]) -> str | None:
    name = _objective_in(m.group("metric"))
    if name is None:
        return (f"names no objective (registered: {', '.join(_registered())}); "
                f"metrics this run reports: {', '.join(example_metrics(cfg))}")
    if name not in cfg.active_objectives:
        return f"needs objective {name!r}, which is not active (active: {', '.join(_active(cfg))})"
    return _needs_eval(cfg) if m.group("kind") == mk.EVAL else None


def _needs_finetune(cfg: RunConfig, _m: re.Match[str]) -> str | None:
    return None if cfg.finetune is not None else "is reported by fine-tuning runs only (a finetune: section)"


@dataclass(frozen=True)
class _Rule:
    pattern: re.Pattern[str]
    check: Callable[[RunConfig, re.Match[str]], str | None]


def _always(_cfg: RunConfig, _m: re.Match[str]) -> str | None:
    return None


def _pattern(text: str) -> re.Pattern[str]:
    """A whole-key pattern whose groups are spelled by models/metric_keys.py: "{LOSS}total" matches
    "loss/total" only."""
    groups = {name: re.escape(getattr(mk, name)) for name in ("LOSS", "TRAIN", "EVAL", "MEMORY", "DATA", "MOE")}
    return re.compile("^" + text.format(**groups) + "$")


_RULES: tuple[_Rule, ...] = (
    _Rule(_pattern(f"({'|'.join(_ALWAYS)})"), _always),
    _Rule(_pattern("({DATA}|{MEMORY}).+"), _always),
    _Rule(_pattern("({MOE}.+|{LOSS}moe_.+)"), _needs_moe),
    _Rule(_pattern("{LOSS}total"), _always),
    _Rule(_pattern("{LOSS}(?P<name>.+)"), _needs_objective),
    _Rule(_pattern("{EVAL}(loss|samples)"), lambda cfg, _m: _needs_eval(cfg)),
    _Rule(_pattern(r"{EVAL}((i2t|t2i)_r\d+|chance_r1|candidates)"), _needs_scorer),
    _Rule(_pattern("{EVAL}((val|test)_.+|train_examples)"), _needs_finetune),
    _Rule(_pattern("{EVAL}(zs|probe)_.+"), lambda cfg, _m: _needs_eval(cfg)),
    _Rule(_pattern("(?P<kind>{TRAIN}|{EVAL})(?P<metric>.+)"), _needs_named_objective),
)


def metric_problem(metric: str, cfg: RunConfig) -> str | None:
    """None when a run of `cfg` reports `metric`, else why it does not (one clause)."""
    for rule in _RULES:
        m = rule.pattern.match(metric)
        if m:
            return rule.check(cfg, m)
    return f"is not a metric mmpt reports; metrics this run reports: {', '.join(example_metrics(cfg))}"


def example_metrics(cfg: RunConfig) -> list[str]:
    """The main metric names a run of `cfg` reports (for error messages; not exhaustive)."""
    names = [mk.TOTAL_LOSS, *(mk.key(mk.LOSS, n) for n in _active(cfg))]
    names += [mk.key(mk.LOSS, "moe_aux")] if cfg.moe.enabled else []
    if cfg.data.eval:
        names += [mk.key(mk.EVAL, f"{n}_acc") for n in _active(cfg)]
        if any(n in cfg.active_objectives for n in RETRIEVAL_SCORERS):
            names += list(mk.RETRIEVAL_R1)
    return [*names, "samples_per_s", "tokens_per_s"]

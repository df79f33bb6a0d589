"""The Ray Train controller's poll interval: chosen per run, handed to Ray Train through the
environment around fit(), and never left behind in the process."""

from __future__ import annotations

import os

import pytest

from jobs.config import ScalingConfig
from orchestrator.config import ConfigError, load_config
from orchestrator.run.scaling import POLL_ENV, controller_env, report_poll_s

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize(("workers", "want"), [(1, 0.1), (2, 0.1), (10, 0.1), (64, 0.64), (200, 2.0), (4096, 2.0)])
def test_the_default_grows_with_the_workers_within_bounds(workers: int, want: float) -> None:
    assert report_poll_s(ScalingConfig(num_workers=workers), {}) == pytest.approx(want)


def test_the_config_beats_the_variable_and_the_variable_beats_the_default() -> None:
    assert report_poll_s(ScalingConfig(num_workers=2), {POLL_ENV: "0.5"}) == 0.5
    assert report_poll_s(ScalingConfig(num_workers=2, report_poll_s=2), {POLL_ENV: "0.5"}) == 2.0


def test_the_variable_is_set_for_the_fit_and_restored_after(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(POLL_ENV, raising=False)
    with controller_env(ScalingConfig(num_workers=2)):
        assert os.environ[POLL_ENV] == "0.1"  # what Ray Train copies to its controller and workers
    assert POLL_ENV not in os.environ
    monkeypatch.setenv(POLL_ENV, "0.7")  # the user's own
    with pytest.raises(RuntimeError), controller_env(ScalingConfig(num_workers=2, report_poll_s=1.5)):
        assert os.environ[POLL_ENV] == "1.5"
        raise RuntimeError("the fit failed")
    assert os.environ[POLL_ENV] == "0.7"


@pytest.mark.parametrize("raw", ["0", "-1", "soon", "nan"])
def test_a_bad_variable_is_a_one_line_config_error(raw: str) -> None:
    with pytest.raises(ConfigError) as err:
        report_poll_s(ScalingConfig(num_workers=2), {POLL_ENV: raw})
    assert err.value.problems == [f"{POLL_ENV}={raw!r}: seconds between Ray Train's polls must be a positive number; "
                                  "unset it, or set scaling.report_poll_s"]
    assert report_poll_s(ScalingConfig(num_workers=2, report_poll_s=0.5), {POLL_ENV: raw}) == 0.5  # the config wins


def test_a_non_positive_interval_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="scaling.report_poll_s"):
        load_config(os.path.join(ROOT, "jobs/configs/quickstart.yaml"), ["scaling.report_poll_s=0"])

"""Hostile config input: each case is one line (ConfigError, exit 2), never a traceback, never accepted
when it cannot train (no Ray, no data)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "jobs" / "configs" / "quickstart.yaml"


def _problems(path: str | Path | None, overrides: list[str] = ()) -> list[str]:  # type: ignore[assignment]
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return info.value.problems


def test_a_config_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert _problems(path) == [f"{path}: not UTF-8 text (byte 0xe9 at offset 9); save the config as UTF-8"]


@pytest.mark.parametrize("text", ["a:\n" + "".join("  " * i + "a:\n" for i in range(1, 3000)),
                                  "train: " + "[" * 3000 + "]" * 3000 + "\n"])
def test_a_deeply_nested_yaml_is_one_line(tmp_path: Path, text: str) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text(text)
    assert _problems(path) == [f"{path}: nested too deeply to be a run config"]


def test_a_deeply_nested_override_value_is_one_line() -> None:
    (problem,) = _problems(None, ["train.betas=" + "[" * 5000 + "]" * 5000])
    assert problem.endswith("value nested too deeply")


@pytest.mark.parametrize("override", ["train.lr=.inf", "train.lr=.nan", "train.weight_decay=.inf",
                                      "train.grad_clip=.inf", "objectives.mlm=.inf"])
def test_infinite_or_nan_floats_are_refused(override: str) -> None:
    key, value = override.split("=")
    (problem,) = _problems(None, [override])
    assert problem.startswith(f"{key} = ") and "finite number" in problem


@pytest.mark.parametrize("betas", ["[1.0, 0.98]", "[0.9, -0.1]", "[0.9, 1.5]"])
def test_adam_betas_outside_0_1_are_a_config_error(betas: str) -> None:
    (problem,) = _problems(None, [f"train.betas={betas}"])
    assert problem.startswith("train.betas = ") and "each Adam beta must be in [0, 1)" in problem


@pytest.mark.parametrize("seed", [2**64, 2**32, -1])
def test_a_seed_beyond_what_the_generators_take_is_a_config_error(seed: int) -> None:
    (problem,) = _problems(None, [f"train.seed={seed}"])
    assert problem.startswith(f"train.seed = {seed}: ")


def test_the_largest_seed_allowed_loads() -> None:
    assert load_config(None, [f"train.seed={2**32 - 1}"]).train.seed == 2**32 - 1


@pytest.mark.parametrize(("url", "says"), [("ftp://127.0.0.1:21", "must use http:// or https://, not ftp://"),
                                           ("http://", "names no host"),
                                           ("http://127.0.0.1:port", "port that is not a number")])
def test_an_endpoint_that_is_not_http_is_a_config_error(url: str, says: str) -> None:
    (problem,) = _problems(None, [f"storage.endpoint_url={url}"])
    assert problem.startswith(f"storage.endpoint_url = {url!r}: ") and says in problem


def test_hang_timeout_and_upload_mode_are_validated() -> None:
    assert load_config(QUICKSTART).train.checkpoint_upload == "background"
    (problem,) = _problems(None, ["train.hang_timeout_s=-1"])
    assert problem.startswith("train.hang_timeout_s = -1: ")
    (problem,) = _problems(None, ["train.checkpoint_upload=lazy"])
    assert problem.startswith("train.checkpoint_upload = 'lazy': ")

"""The run directory's one metrics reader (orchestrator/run/files.py) and the metric-key module
(models/metric_keys.py) that every writer and reader of metric names goes through."""

from __future__ import annotations

from pathlib import Path

from jobs.storage import StorageOptions
from models import metric_keys as mk
from orchestrator.run.files import METRICS, MetricsFile, RunFiles, read_metrics, read_summary, run_uri


def test_read_metrics_keeps_one_record_per_step_the_later_line_winning(tmp_path: Path) -> None:
    (tmp_path / METRICS).write_text('{"step": 1, "loss/total": 3.0}\n{"step": 2, "loss/total": 2.0}\nnot json\n'
                                    '{"step": 2, "loss/total": 1.5}\n{"step": 3, "loss/to')
    assert read_metrics(tmp_path) == [{"step": 1, "loss/total": 3.0}, {"step": 2, "loss/total": 1.5}]
    assert read_metrics(tmp_path / "absent") == [] and read_summary(tmp_path) is None


def test_metrics_file_reads_appended_lines_and_starts_over_when_the_file_shrank(tmp_path: Path) -> None:
    tail, f = MetricsFile(str(tmp_path)), tmp_path / METRICS
    assert tail.poll() == [] and tail.offset == 0
    f.write_text('{"step": 1}\n{"step": 2')
    assert tail.poll() == [{"step": 1}] and tail.offset == len('{"step": 1}\n')
    with open(f, "a") as fh:
        fh.write('}\n')
    assert tail.poll() == [{"step": 2}] and not tail.restarted
    f.write_text("{}\n")
    assert tail.poll() == [{}] and tail.restarted


def test_the_run_directory_is_storage_path_runs_name(tmp_path: Path) -> None:
    from jobs.config import RunConfig

    cfg = RunConfig.model_validate({"name": "r1", "storage": {"path": str(tmp_path), "endpoint_url": "http://h:1"}})
    files = RunFiles(cfg)
    assert files.uri == run_uri(str(tmp_path), "r1") == f"{tmp_path}/runs/r1"
    assert files.opts == StorageOptions("http://h:1", None) == StorageOptions.of({"endpoint_url": "http://h:1"})
    files.append_metrics({"step": 1, "x": 0.5})
    files.append_metrics({"step": 2})
    assert read_metrics(files.uri) == [{"step": 1, "x": 0.5}, {"step": 2}]


def test_metric_keys_build_and_parse_what_the_writers_report() -> None:
    record = {"step": 4, "loss/total": 1.0, "loss/itc": 0.5, "eval/i2t_r1": 0.2, "moe/layer3/load": [0.5, 0.5]}
    assert mk.strip(mk.LOSS, record) == {"total": 1.0, "itc": 0.5}
    assert mk.keyed(mk.LOSS, {"itc": 0.5}) == {"loss/itc": 0.5} and mk.key(mk.EVAL, "x") == "eval/x"
    assert mk.last_of(mk.EVAL, [{"eval/a": 1}, {"eval/a": 2}, {"step": 9}]) == {"a": 2}
    assert mk.first_of(mk.MEMORY, [{"step": 1}, {"memory/total_bytes": 7}, {"memory/total_bytes": 8}]) == {"total_bytes": 7}
    assert mk.moe_layer(mk.moe_layer_key(3, "load")) == (3, "load") and mk.moe_layer("moe/dropped") is None
    assert mk.TOTAL_LOSS == "loss/total" and mk.RETRIEVAL_R1 == ("eval/i2t_r1", "eval/t2i_r1")


def test_checkpoint_folders_are_named_as_the_run_directory_expects() -> None:
    from jobs.checkpoint import dir_name
    from orchestrator.run.files import CHECKPOINT_PREFIX, is_checkpoint

    assert dir_name(5) == f"{CHECKPOINT_PREFIX}0000005" and is_checkpoint(dir_name(12)) and not is_checkpoint("logs")


def test_a_runs_tokenizer_is_looked_for_in_one_order_by_the_run_the_plan_and_export() -> None:
    from jobs.config import RunConfig
    from orchestrator.run.files import tokenizer_candidates

    cfg = RunConfig.model_validate({"name": "r", "data": {"tokenizer": "t.json"}, "model": {"init": {"text": "hf/bert"}}})
    assert tokenizer_candidates(cfg, "d/train", "runs/r") == [
        "t.json", "hf/bert/tokenizer.json", "d/train/tokenizer.json", "d/tokenizer.json", "runs/r/tokenizer.json"]
    assert tokenizer_candidates(RunConfig.model_validate({"name": "r"}), None, "runs/r") == ["runs/r/tokenizer.json"]

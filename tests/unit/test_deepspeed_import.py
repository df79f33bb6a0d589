"""DeepSpeed's first import hides MLflow (its autotuner's optional import) and leaves it importable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip("mlflow")  # mmpt[tracking]: without MLflow there is nothing to hide

PROBE = """
import json, sys
from models.deepspeed_import import import_deepspeed
{before}
ds = import_deepspeed()
from deepspeed.autotuning import autotuner
after_import = "mlflow" in sys.modules
import mlflow
print(json.dumps({{"autotuner_has_mlflow": autotuner.has_mlflow, "mlflow_after_import": after_import,
                  "mlflow_module": type(mlflow).__name__, "same": import_deepspeed() is ds}}))
"""


def _probe(before: str = "") -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(before=before)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={"DS_ACCELERATOR": "cpu", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_mlflow_is_hidden_from_deepspeed_and_importable_after() -> None:
    assert _probe() == {"autotuner_has_mlflow": False, "mlflow_after_import": False, "mlflow_module": "module",
                        "same": True}


def test_an_mlflow_imported_before_is_left_alone() -> None:
    assert _probe("import mlflow") == {"autotuner_has_mlflow": True, "mlflow_after_import": True,
                                       "mlflow_module": "module", "same": True}

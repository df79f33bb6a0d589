"""Golden outputs: every preset's numbers for a fixed seed and input, against a stored copy.

open_clip's way (tests/test_inference.py): the tiny model of each preset (tests/unit/conftest.py,
weights drawn from seed 0) runs on the fixed batch in eval mode with the views' generator at seed 0;
its loss, every loss term and metric, and a fingerprint of every floating-point encoder output on
the clean batch (its L2 norm and its dot product with a fixed cosine pattern: a plain sum of
layer-normed states is ~0 whatever the weights) must match `golden/presets.json`. A refactor that changes a
number fails here, whichever module it touched; the shape and contract tests would not notice.

When a change is meant to move the numbers (a new init, a fixed bug), regenerate the file and say
why in the commit:

    .venv/bin/python -m tests.unit.test_golden          # rewrites tests/unit/golden/presets.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from models import PRESETS, Pretrainer
from models.objectives.base import encoder_inputs
from tests.unit.conftest import build, make_batch, moe_cfg

GOLDEN = Path(__file__).parent / "golden" / "presets.json"
# the generative presets' tiny dVAE: a 16-entry codebook over the 2x2 grid of a 16-pixel image
DVAE = {"codebook_size": 16, "downsample": 8, "channels": 8, "codebook_dim": 8}
# case -> how to build it: every preset with its paper's objectives, plus one MoE model
CASES: dict[str, dict[str, Any]] = {
    **{name: {"preset": name} | ({"dvae": DVAE} if p.family in ("dvae", "dalle") else {})
       for name, p in sorted(PRESETS.items())},
    "vilt+moe": {"preset": "vilt", "moe": moe_cfg()},
}
RTOL, ATOL = 1e-4, 1e-6  # float32 on CPU: summation order may differ across builds, not more


def _model(case: str) -> Pretrainer:
    spec = dict(CASES[case])
    return build(spec.pop("preset"), None, spec.pop("moe", None), **spec).eval()


@torch.no_grad()
def outputs(case: str) -> dict[str, float]:
    """The case's figures, by name."""
    model, batch = _model(case), make_batch()
    out = model(batch, torch.Generator().manual_seed(0))
    figures = {"loss": out["loss"].item()}
    figures |= {f"losses/{k}": v.item() for k, v in sorted(out["losses"].items())}
    figures |= {f"metrics/{k}": v.item() for k, v in sorted(out["metrics"].items())}
    for key, value in sorted(model.encoder(encoder_inputs(batch)).items()):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            flat = value.double().flatten()
            figures[f"{key}/norm"] = flat.norm().item()
            figures[f"{key}/proj"] = (flat * torch.arange(flat.numel(), dtype=torch.float64).cos()).sum().item()
    return figures


def _close(key: str, got: float, want: dict[str, float]) -> bool:
    """Within RTOL of the stored figure; a projection within RTOL of its tensor's norm."""
    scale = want[key.removesuffix("/proj") + "/norm"] if key.endswith("/proj") else abs(want[key])
    return abs(got - want[key]) <= RTOL * scale + ATOL


def test_every_preset_has_a_golden_case() -> None:
    stored = json.loads(GOLDEN.read_text())
    assert sorted(stored) == sorted(CASES)
    assert all(len(figures) >= 4 for figures in stored.values())  # loss, a term, a metric or an output


@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_match_the_stored_ones(case: str) -> None:
    want = json.loads(GOLDEN.read_text())[case]
    got = outputs(case)
    assert sorted(got) == sorted(want), case
    off = {k: (got[k], want[k]) for k in want if not _close(k, got[k], want)}
    assert off == {}, f"{case}: (now, stored) differ; if meant, regenerate (see the module docstring)"


if __name__ == "__main__":
    torch.set_num_threads(1)
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({case: outputs(case) for case in sorted(CASES)}, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN} ({len(CASES)} cases)", file=sys.stderr)

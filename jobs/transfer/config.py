"""The transfer sections of a run config: `eval.zero_shot` and `finetune`.

    eval:
      zero_shot: {tasks: auto, probe: true, max_samples: 512,
                  user: [{name: pets, source: data/pets, classes: [cat, dog]}]}
    finetune: {task: vqa, from_run: runs/pretrain, init: pretrained, labels: 1000}
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from models.schema import Strict

# The shapes world's classification tasks (jobs/transfer/tasks.py builds them; named here so the
# schema stays free of image and tokenizer imports).
SHAPES_TASKS = ("shape", "color", "count")
# CLIP's ImageNet prompt ensemble, a few of its 80 (Radford et al. 2021, notebook "Prompt_Engineering").
CLIP_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a photo of the {}.",
                  "a close-up photo of a {}.", "a photo of a small {}.", "a photo of a large {}.")
HEAD_TASKS = ("vqa", "retrieval")  # the other tasks are classification: the linear-probe head


class UserTaskConfig(Strict):
    """A labelled dataset as a classification task."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$", description="names the metrics (zs_<name>_top1_acc)")
    source: str | None = Field(None, description="shards whose json has `label_field`, or an image folder with one "
                               "sub-folder per class; null = data.eval (zero-shot) / data.train + data.eval (finetune)")
    label_field: str = Field("label", description="json field holding the class name or index")
    classes: list[str] = Field(min_length=2, description="class names, in label-index order")
    templates: list[str] = Field(default_factory=lambda: list(CLIP_TEMPLATES),
                                 description="prompt templates, '{}' = the class name (CLIP's ensemble by default)")

    @field_validator("templates")
    @classmethod
    def _braces(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if "{}" not in t]
        if bad or not v:
            raise ValueError(f"every template needs '{{}}' for the class name, got {bad or v}")
        return v


class ZeroShotConfig(Strict):
    """Zero-shot classification (CLIP) for encoders with an ITC head, and a linear probe for every encoder,
    on the held-out split."""

    tasks: Literal["auto"] | list[str] = Field("auto", description="shapes-world tasks (shape, color, count); "
                                               "auto = all of them when the held-out samples carry a scene")
    user: list[UserTaskConfig] = Field(default_factory=list, description="user tasks from labelled data")
    probe: bool = Field(True, description="also fit a ridge linear probe on frozen image features "
                        "(first half of the samples) and score it on the second half: probe_<task>_acc")
    max_samples: int = Field(512, ge=0, description="labelled held-out samples read; 0 = no zero-shot/probe")

    @field_validator("tasks")
    @classmethod
    def _known(cls, v: str | list[str]) -> str | list[str]:
        unknown = [t for t in v if t not in SHAPES_TASKS] if isinstance(v, list) else []
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; shapes-world tasks: {', '.join(SHAPES_TASKS)} "
                             "(a labelled dataset of your own goes under user:)")
        return v


class FinetuneConfig(Strict):
    """Fine-tune a pretrained encoder (or the same architecture from scratch) on a labelled task."""

    user: UserTaskConfig | None = Field(None, description="the task, when it is a dataset of your own")
    task: str = Field(description="shape | color | count (linear probe), vqa (answer classification), "
                      "retrieval (image-text, contrastive), or the name of `user`")
    from_run: str | None = Field(None, description="pretrained run directory: its architecture, tokenizer and "
                                 "latest checkpoint; null = this config's model, from scratch")
    init: Literal["pretrained", "scratch"] = Field("pretrained", validate_default=True,
                                                   description="start from from_run's weights, or from a fresh "
                                                   "init of the same architecture")
    labels: int | None = Field(None, ge=1, description="labelled training examples used (a seeded subset); null = all")
    pool: int | None = Field(None, ge=1, description="training samples read from data.train at most; null = all")
    val_samples: int = Field(128, ge=0, description="samples of data.train held out as the validation split")
    subset_seed: int | None = Field(None, description="seed of the --labels subset; null = train.seed")
    freeze_encoder: bool | None = Field(None, description="train only the head; null = the head's default "
                                        "(probe: frozen; vqa, retrieval: fine-tuned)")
    checkpoint: str | None = Field(None, description="set by the driver: the checkpoint folder of from_run")

    @field_validator("task")
    @classmethod
    def _task(cls, v: str, info: ValidationInfo) -> str:
        user = info.data.get("user")
        known = [*SHAPES_TASKS, *HEAD_TASKS, *([user.name] if user else [])]
        if v not in known:
            raise ValueError(f"allowed: {', '.join(known)} (a dataset of your own: finetune.user)")
        return v

    @field_validator("init")
    @classmethod
    def _init(cls, v: str, info: ValidationInfo) -> str:
        if v == "pretrained" and not info.data.get("from_run"):
            raise ValueError("needs from_run (a pretrained run directory); init: scratch trains this config's "
                             "model from a fresh init")
        return v

    @property
    def head(self) -> str:
        return self.task if self.task in HEAD_TASKS else "probe"

    @property
    def frozen(self) -> bool:
        return self.head == "probe" if self.freeze_encoder is None else self.freeze_encoder

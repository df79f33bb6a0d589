"""The run config: one typed tree (`RunConfig`) that a YAML file and `--set` overrides validate into.

Every section forbids unknown keys, so a typo is an error that names the field, never a silently
ignored setting. Checks that span sections (MoE vs ZeRO-3, experts vs workers) live in
`cross_check`, which returns every problem at once instead of stopping at the first.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import Field, PositiveFloat, ValidationInfo, field_validator, model_validator

from jobs.transfer.config import FinetuneConfig, ZeroShotConfig
from models.config import AdversarialConfig, ModelConfig, MoEConfig
from models.schema import Strict

Precision = Literal["fp32", "bf16"]


class DataSource(Strict):
    """One dataset of a mixture: its shards and its sampling weight."""

    shards: str | list[str] = Field(description="folder, prefix, brace pattern or list (local or s3://)")
    weight: float = Field(1.0, gt=0, description="relative probability that a batch comes from this source")


class DataConfig(Strict):
    """Where the shards are and how samples become tensors."""

    train: str | list[str] | list[DataSource] = Field(
        "data/shapes/train",
        description="train shards: folder, prefix, brace pattern or list; or a mixture [{shards, weight}, ...]")
    eval: str | list[str] | None = Field("data/shapes/eval", description="held-out shards (same forms); null = no eval")
    tokenizer: str | None = Field(None, description="HF tokenizer.json; default: beside the shards, else one trained for the run")
    image_size: int = Field(48, ge=8, description="images are resized to this square size")
    max_text_len: int = Field(32, ge=4, description="captions are truncated/padded to this many tokens")
    max_objects: int = Field(3, ge=0, description="scene objects kept per sample (boxes/labels, padded with -1)")
    object_vocab: str | None = Field(None, description="object classes, one per line (BUTD's objects_vocab.txt: "
                                     "synonyms comma-separated); default: the dataset card's")
    shuffle_seed: int | None = Field(0, description="shard-order and within-shard shuffling seed; null = file order")
    read_tasks: int = Field(0, ge=0, description="concurrent shard-reading tasks per worker; 0 = Ray Data decides")
    prefetch_batches: int = Field(2, ge=0, description="batches each worker prefetches")
    unit_samples: int = Field(512, ge=1, description="samples per read task: shards are cut into units of this "
                              "many, and a worker fetches and decodes only its own units")
    next_epoch_ahead: bool = Field(True, description="start the next epoch's pipeline while the current one is half "
                                   "read, so the epoch boundary does not wait for its start-up (false: after it ends)")
    max_bad_fraction: float = Field(0.05, ge=0, le=1, description="error budget: bad samples / samples read")
    image_column: str = Field("jpg", description="Parquet shards: column with the encoded image bytes")
    caption_column: str = Field("caption", description="Parquet shards: column with the caption")
    tokenizer_sample: int = Field(20000, ge=100, description="captions sampled to train a tokenizer when none exists")
    vocab_size: int = Field(8000, ge=64, description="vocabulary of a tokenizer trained for the run")
    record_samples: bool = Field(False, description="write the sample ids each rank trained on, per step, "
                                 "to runs/<name>/samples/ (audits exactly-once delivery)")


    def sources(self) -> list[DataSource]:
        """The training data as a list of weighted sources (one source unless it is a mixture)."""
        if isinstance(self.train, list) and self.train and isinstance(self.train[0], DataSource):
            return list(self.train)  # type: ignore[arg-type]
        return [DataSource(shards=self.train)]  # type: ignore[arg-type]


class TrainConfig(Strict):
    steps: int = Field(200, ge=1, description="optimizer steps")
    batch_size: int = Field(32, ge=1, description="micro-batch per worker (samples per forward)")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = Field(20, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decays to lr * min_lr_ratio")
    grad_clip: float = Field(1.0, ge=0, description="max gradient norm; 0 = no clipping")
    precision: Precision = "fp32"
    activation_checkpointing: bool = Field(False, description="recompute each transformer layer's activations "
                                           "in backward instead of keeping them (torch.utils.checkpoint per layer)")
    adversarial: AdversarialConfig = Field(default_factory=AdversarialConfig,
                                           description="VILLA/FreeLB perturbations of the embeddings")
    log_every: int = Field(10, ge=1, description="steps between metric reports")
    checkpoint_every: int = Field(100, ge=0, description="steps between checkpoints; 0 = only at the end")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept on storage")
    checkpoint_upload: Literal["background", "blocking"] = Field(
        "background", description="background: the step loop goes on while each rank uploads its part (a "
        "checkpoint counts once every rank's upload is done); blocking: each checkpoint waits for its upload")
    max_failures: int = Field(0, ge=-1, description="worker-group restarts before the run fails; -1 = unlimited")
    hang_timeout_s: float = Field(0, ge=0, description="a rank that makes no progress (a collective, the data "
                                  "stream) for this long fails the step, naming what it waited for; 0 = off")
    # torch/numpy generators take 64/32-bit seeds, and per-rank seeds are derived as seed * 1000 + rank
    seed: int = Field(0, ge=0, lt=2**32, description="model-init and masking seed, 0 <= seed < 2**32")

    @field_validator("betas")
    @classmethod
    def _adam_betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        # Adam's moment decays (Kingma & Ba 2015): beta = 1 never forgets, beta < 0 oscillates;
        # torch.optim.AdamW refuses both, but only inside the workers after start-up.
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError("each Adam beta must be in [0, 1), e.g. [0.9, 0.98]")
        return v


class DeepSpeedConfig(Strict):
    zero_stage: int = Field(2, ge=0, le=3, description="ZeRO stage 0-3")
    offload_optimizer: bool = Field(False, description="keep optimizer states on CPU (ZeRO-Offload)")
    extra: dict[str, Any] = Field(default_factory=dict, description="raw DeepSpeed config merged on top")


class ParallelConfig(Strict):
    """Model parallelism besides ZeRO's data parallelism (jobs/tensor_parallel.py)."""

    tp_size: int = Field(1, ge=1, description="Megatron tensor parallelism: each transformer layer's attention "
                         "and FFN split over tp_size workers; data parallelism over num_workers / tp_size")


class ScalingConfig(Strict):
    """Ray resources of a run; `orchestrator.run.scaling` turns them into Ray Train / Ray Data arguments.

    Custom resources pick node types: a worker asking for `train_gpu` only runs on (and makes the
    autoscaler add) a node type that advertises `train_gpu` (see ray_cluster.yaml).
    """

    num_workers: int = Field(2, ge=1, description="Ray Train workers (one per GPU on a GPU cluster)")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    data_cpus: float = Field(2.0, ge=0, description="extra CPUs a local Ray gets for Ray Data tasks")
    limit_data_per_rank: bool = Field(True, description="on a local Ray: each rank's Ray Data executor uses at "
                                      "most data_cpus / num_workers CPUs (false: each budgets for all of them)")
    resources_per_worker: dict[str, PositiveFloat] = Field(
        default_factory=dict, description="custom Ray resources each training worker asks for, e.g. {train_gpu: 1}")
    accelerator_type: str | None = Field(None, description="GPU kind the workers need (Ray's accelerator_type, e.g. A100)")
    data_num_cpus: PositiveFloat | None = Field(None, description="CPUs per Ray Data read/preprocess task; null = 1")
    data_resources: dict[str, PositiveFloat] = Field(
        default_factory=dict, description="custom Ray resources each preprocessing task asks for, e.g. {data_cpu: 1}")
    host_memory: Literal["retain", "system"] = Field(
        "retain", description="a training worker's malloc: retain (freed memory stays mapped for the next "
        "step, below 32 MiB blocks; glibc otherwise hands it back and the next step page-faults on it) or "
        "system (glibc's defaults); see jobs/worker_host.py")
    report_poll_s: PositiveFloat | None = Field(
        None, description="seconds between the Ray Train controller's polls of its workers "
        "(RAY_TRAIN_HEALTH_CHECK_INTERVAL_S): it takes one report per poll, and a rank's next report "
        "waits for it; null = the variable when set, else num_workers / 100 within [0.1, 2]")

    @field_validator("resources_per_worker", "data_resources")
    @classmethod
    def _custom_only(cls, v: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        builtin = sorted(set(v) & {"CPU", "GPU"})
        if builtin:
            source = ("scaling.cpus_per_worker / scaling.use_gpu" if info.field_name == "resources_per_worker"
                      else "scaling.data_num_cpus")
            raise ValueError(f"{'/'.join(builtin)} is set by {source}; list only custom resources here")
        return v

    @model_validator(mode="after")
    def _accelerator_needs_gpu(self) -> ScalingConfig:
        if self.accelerator_type is not None and not self.use_gpu:
            raise ValueError(f"accelerator_type = {self.accelerator_type!r} needs use_gpu: true "
                             "(it names the kind of GPU each worker gets)")
        return self


class StorageConfig(Strict):
    path: str = Field(".", description="root of runs/<name>/: a local folder or s3://bucket/prefix")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint; default: AWS_ENDPOINT_URL")
    region: str | None = None

    @field_validator("endpoint_url")
    @classmethod
    def _http_only(cls, v: str | None) -> str | None:
        from jobs.storage import endpoint_problem

        if v is not None and (problem := endpoint_problem(v)):
            raise ValueError(problem)
        return v


class EvalConfig(Strict):
    every: int = Field(0, ge=0, description="steps between held-out evaluations; 0 = only at the end")
    max_samples: int = Field(512, ge=1)
    batch_size: int = Field(16, ge=2, description="also the retrieval candidate set size")
    generate_samples: int = Field(32, ge=0, description="DALL-E runs: eval captions an image is generated for "
                                  "and judged against (jobs/generative/probe.py); dVAE runs: eval images whose "
                                  "reconstruction is judged; 0 = none")
    zero_shot: ZeroShotConfig = Field(default_factory=ZeroShotConfig, description="zero-shot classification "
                                      "(ITC encoders) and a linear probe on the held-out split (jobs/transfer/)")


class MLflowTracking(Strict):
    """An MLflow tracking server or store; every run is one MLflow run in `experiment`."""

    tracking_uri: str = Field(description="sqlite:///mlflow.db, http(s)://server:5000, databricks, or a "
                              "folder (MLflow's file store)")
    experiment: str = Field("mmpt", min_length=1, description="experiment name; created when missing")


class WandbTracking(Strict):
    """A Weights & Biases project; `mode: offline` writes the run to disk for a later `wandb sync`."""

    project: str = Field(min_length=1)
    mode: Literal["online", "offline", "disabled"] = "online"
    entity: str | None = Field(None, description="team or user; default: the API key's")


class TrackingConfig(Strict):
    """Experiment trackers the driver logs every report, the resolved config, the summary and the
    artifacts to (orchestrator/tracking/); any subset, none by default."""

    mlflow: MLflowTracking | None = None
    tensorboard: bool = Field(False, description="TensorBoard event files in runs/<name>/tensorboard/")
    wandb: WandbTracking | None = None
    group: str | None = Field(None, description="groups tracked runs (W&B group, MLflow parent run); a sweep "
                              "sets it to its name")

    @property
    def enabled(self) -> list[str]:
        """The trackers switched on, by name."""
        return [name for name, on in (("mlflow", self.mlflow), ("tensorboard", self.tensorboard),
                                      ("wandb", self.wandb)) if on]


class RunConfig(Strict):
    name: str = Field("quickstart", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    moe: MoEConfig = Field(default_factory=MoEConfig)
    objectives: dict[str, float] = Field(default_factory=lambda: {"mlm": 1.0, "itm": 1.0})
    train: TrainConfig = Field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    finetune: FinetuneConfig | None = Field(None, description="fine-tune on a labelled task instead of "
                                            "pretraining (mmpt finetune; jobs/transfer/)")

    @field_validator("objectives", mode="before")
    @classmethod
    def _drop_nulls(cls, v: Any) -> Any:
        # `--set objectives.itm=null` switches an objective off, like weight 0
        return {k: w for k, w in v.items() if w is not None} if isinstance(v, dict) else v

    @property
    def active_objectives(self) -> dict[str, float]:
        return {k: w for k, w in self.objectives.items() if w > 0}

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def config_hash(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def cross_check(cfg: RunConfig) -> list[tuple[str, Any, str]]:
    """Problems that span sections, as (field, value, what is allowed)."""
    from models.factory import objective_problems, weight_problems  # torch import; only once the tree parsed
    from models.presets import PRESETS

    problems: list[tuple[str, Any, str]] = []
    if cfg.model.preset not in PRESETS:
        problems.append(("model.preset", cfg.model.preset, f"allowed: {', '.join(sorted(PRESETS))}"))
    problems += weight_problems(cfg.objectives)  # unknown names, negative weights, none enabled
    if cfg.model.preset in PRESETS:  # objectives the preset's encoder cannot serve (e.g. itm on clip)
        problems += objective_problems(cfg.model, cfg.objectives)
    if cfg.moe.enabled and cfg.deepspeed.zero_stage == 3:
        problems.append(("deepspeed.zero_stage", 3,
                         f"DeepSpeed's MoE layers cannot be sharded by ZeRO stage 3 (moe.num_experts="
                         f"{cfg.moe.num_experts}); use zero_stage 0-2, or moe.num_experts=0 for a dense model"))
    if cfg.moe.enabled and cfg.scaling.num_workers % cfg.moe.ep_size != 0:
        problems.append(("moe.ep_size", cfg.moe.ep_size,
                         f"must divide scaling.num_workers={cfg.scaling.num_workers} "
                         "(experts are split over groups of ep_size workers)"))
    # MoE layer indices are FFN depths (models.blocks.Blocks.depth): num_layers for single-stream
    # presets, more for ViLBERT's co-attention blocks (two FFNs per block) or explicit stack sizes.
    if cfg.model.preset in PRESETS:
        from models.blocks import resolve

        problems += cfg.moe.layer_problems(resolve(cfg.model).depth)
    else:
        problems += cfg.moe.layer_problems(cfg.model.num_layers)
    if cfg.model.preset in ("dvae", "dalle"):  # the dVAE's grid must tile the images
        from models.generative_config import image_problems

        problems += [("model.dvae.downsample", cfg.model.dvae.downsample, p) for p in
                     image_problems(cfg.model.dvae, cfg.data.image_size)]
    if cfg.parallel.tp_size > 1:
        from jobs.tensor_parallel import problems as tp_problems
        from models.ffn import ffn_size

        m = cfg.model
        problems += tp_problems(cfg.scaling.num_workers, cfg.parallel.tp_size, m.num_heads, m.hidden_size,
                                ffn_size(m.hidden_size, m.mlp_ratio), cfg.deepspeed.zero_stage,
                                cfg.moe.num_experts, cfg.moe.ep_size)
    if cfg.data.image_size % cfg.model.patch_size != 0:
        problems.append(("model.patch_size", cfg.model.patch_size,
                         f"must divide data.image_size={cfg.data.image_size}"))
    return problems

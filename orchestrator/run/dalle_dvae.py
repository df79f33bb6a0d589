"""A DALL-E run's frozen dVAE, resolved on the driver before any worker starts.

`model.dalle.dvae` names the dVAE run directory (local). The driver checks it is a finished-enough
run of preset `dvae` on images of the same size, consolidates its latest checkpoint, writes the
dVAE's tensors into this run's directory (jobs/generative/frozen_dvae.py: WEIGHTS_FILE), and returns
the config with `model.dvae` replaced by the dVAE run's (the architecture the weights fit) and
`model.dalle.dvae_weights` set. The resolved config is what `config.yaml` records, so the run can be
rebuilt, resumed and sampled from (`mmpt generate`) without the dVAE run.
"""

from __future__ import annotations

from pathlib import Path

from jobs import storage
from jobs.config import RunConfig
from orchestrator.config import ConfigError
from orchestrator.run.files import run_config


def resolve_dalle(cfg: RunConfig, run_uri: str, opts: storage.StorageOptions | None = None) -> RunConfig:
    """`cfg` with the frozen dVAE resolved (unchanged for other presets); ConfigError names the field."""
    if cfg.model.preset != "dalle":
        return cfg
    dalle = cfg.model.dalle
    if dalle.dvae_weights:
        if not storage.exists(dalle.dvae_weights, opts):
            raise ConfigError([f"model.dalle.dvae_weights = {dalle.dvae_weights!r}: file not found"])
        return cfg
    if not dalle.dvae:
        raise ConfigError(["model.dalle.dvae = None: preset dalle needs the directory of a finished dVAE run "
                           "(train one with model.preset=dvae, then --set model.dalle.dvae=runs/<name>)"])
    run_dir = Path(dalle.dvae)
    source = run_config(run_dir, f"model.dalle.dvae = {dalle.dvae!r}")
    if source.model.preset != "dvae":
        raise ConfigError([f"model.dalle.dvae = {dalle.dvae!r}: a run of preset {source.model.preset!r}; "
                           "allowed: a run of preset dvae"])
    if source.data.image_size != cfg.data.image_size:
        raise ConfigError([f"model.dalle.dvae = {dalle.dvae!r}: trained on {source.data.image_size}px images, "
                           f"this run has data.image_size={cfg.data.image_size}"])
    from safetensors.torch import save

    from jobs.generative.frozen_dvae import WEIGHTS_FILE, dvae_tensors
    from jobs.pretrained.export import consolidate
    from orchestrator.run.files import latest_checkpoint

    checkpoint = latest_checkpoint(run_dir)
    tensors = dvae_tensors(consolidate(str(checkpoint), source.deepspeed.zero_stage))
    if not tensors:
        raise ConfigError([f"model.dalle.dvae = {dalle.dvae!r}: {checkpoint.name} holds no dVAE weights"])
    uri = storage.join(run_uri, WEIGHTS_FILE)
    if not storage.is_remote(uri):  # the workers run in Ray's own working directory
        uri = str(Path(uri).absolute())
    data = save({k: v.contiguous() for k, v in tensors.items()},
                metadata={"mmpt.dvae_run": str(run_dir), "mmpt.checkpoint": checkpoint.name})
    storage.write_bytes(uri, data, opts)
    raw = cfg.to_dict()
    raw["model"]["dvae"] = source.model.dvae.model_dump(mode="json")
    raw["model"]["dalle"]["dvae_weights"] = uri
    return RunConfig.model_validate(raw)


__all__ = ["resolve_dalle"]

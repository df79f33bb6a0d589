"""Adversarial training on the embeddings (VILLA, Gan et al. 2020; FreeLB, Zhu et al. 2020).

Shapes: B batch, T text tokens, P visual tokens, D model dim.

A perturbation δ is added to the outputs of the text embeddings [B,T,D] and of the visual input
[B,P,D] (the "embedding space" of both papers, not the pixels or the token ids). Each micro-batch:

    clean  = L(x)                                  one ordinary forward
    δ_0    = 0, or uniform noise of L2 norm ≤ init_mag per sample (FreeLB's init)
    K times:  g = ∂L(x + δ)/∂δ                     (gradient w.r.t. δ only: the parameters
              δ ← δ + step_size · g / ‖g‖          collect no gradient from the ascent)
              δ ← δ · min(1, norm_bound / ‖δ‖)     (per sample, per modality; 0 = no bound)
    loss   = L(x) + weight · L(x + δ_K)            VILLA's L_std + R_at (its KL term is not used)

Norms are per sample, over the whole [T,D] (or [P,D]) perturbation of one modality, as FreeLB's
`adv-max-norm`. Every pass replays the RNG state of the clean pass, so all K+2 forwards see the same
masked tokens, negatives, dropout and noisy-gate draws: the ascent climbs the same loss that the
final adversarial term evaluates. The ascent uses `torch.autograd.grad` on δ, so DeepSpeed's
gradient hooks (which fire on parameter gradients) run once, in the engine's one backward.

Cost: K + 2 forwards and K + 1 backward passes per micro-batch (K ascent-only backwards).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from models.config import AdversarialConfig, Modality


def _per_sample_norm(x: Tensor) -> Tensor:
    """[B, 1, ..., 1]: the L2 norm of each sample's slice."""
    return x.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.ndim - 1)))


class EmbeddingPerturbation:
    """Forward hooks that add δ to the text embeddings' and the visual input's outputs.

    The encoder may run several times per model forward (one pass per view: masked text for MLM,
    shuffled pairs for ITM, ...); each call gets its own δ, matched by call order within a pass.
    Inactive (no δ added, no hook cost beyond a check) outside `perturbing()`.
    """

    def __init__(self, encoder: nn.Module, modalities: list[Modality], init_mag: float = 0.0) -> None:
        self.modalities = list(modalities)
        self.init_mag = init_mag
        self.deltas: dict[Modality, list[Tensor]] = {m: [] for m in self.modalities}
        self._calls: dict[Modality, int] = dict.fromkeys(self.modalities, 0)
        self._active = False
        self._handles = []
        modules: dict[Modality, nn.Module] = {"text": encoder.text_embeddings}
        if "image" in self.modalities:
            if getattr(encoder, "_visual_name", None) is None:
                raise ValueError("train.adversarial.modalities has 'image', but no objective reads the image")
            modules["image"] = encoder.visual_embeddings
        for m in self.modalities:
            self._handles.append(modules[m].register_forward_hook(self._hook(m)))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def _init(self, x: Tensor) -> Tensor:
        if self.init_mag <= 0:
            return torch.zeros_like(x, dtype=torch.float32)
        d = torch.rand_like(x, dtype=torch.float32) * 2 - 1
        return d * (self.init_mag * torch.rand_like(d[:, :1, :1]) / _per_sample_norm(d))

    def _hook(self, modality: Modality) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if not self._active:
                return None
            x = output if modality == "text" else output.x_BPD
            i = self._calls[modality]
            self._calls[modality] += 1
            deltas = self.deltas[modality]
            if i == len(deltas):
                deltas.append(self._init(x).requires_grad_())
            d = deltas[i]
            if d.shape != x.shape:
                raise RuntimeError(f"{modality} embeddings changed shape between adversarial passes: "
                                   f"{tuple(d.shape)} then {tuple(x.shape)}")
            x = x + d.to(x.dtype)
            return x if modality == "text" else output._replace(x_BPD=x)

        return hook

    @contextlib.contextmanager
    def perturbing(self) -> Iterator[None]:
        self._active = True
        self._calls = dict.fromkeys(self.modalities, 0)
        try:
            yield
        finally:
            self._active = False

    def all(self) -> list[Tensor]:
        return [d for m in self.modalities for d in self.deltas[m]]

    @torch.no_grad()
    def ascend(self, grads: list[Tensor | None], step_size: float, norm_bound: float) -> None:
        for d, g in zip(self.all(), grads, strict=True):
            if g is None:  # this δ's tokens reached no loss (e.g. a view that ignores the image)
                continue
            d.add_(step_size * g / _per_sample_norm(g))
            if norm_bound > 0:
                d.mul_((norm_bound / _per_sample_norm(d)).clamp(max=1.0))

    def reset(self) -> None:
        self.deltas = {m: [] for m in self.modalities}

    def max_norm(self) -> Tensor:
        """[] largest per-sample L2 norm of any δ (what the norm bound caps), on δ's device (no host sync)."""
        deltas = self.all()
        if not deltas:
            return torch.zeros(())
        return torch.stack([_per_sample_norm(d).max() for d in deltas]).max()


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def adversarial_forward(forward: Callable[[], dict[str, Any]], perturb: EmbeddingPerturbation,
                        cfg: AdversarialConfig, device: torch.device) -> dict[str, Any]:
    """The pretrainer's output dict with loss = clean + weight * adversarial (module doc).

    `forward()` runs the model on the micro-batch (the DeepSpeed engine's forward, or the module's).
    Adds `losses["adv"]` (the adversarial loss) and `metrics["adv_delta_norm"]` (largest δ norm).
    """
    start = _rng_state(device)
    clean = forward()
    perturb.reset()
    for _ in range(cfg.steps):
        _set_rng_state(start, device)
        with perturb.perturbing():
            loss = forward()["loss"]
        deltas = perturb.all()
        grads = torch.autograd.grad(loss, deltas, allow_unused=True) if deltas else []
        perturb.ascend(list(grads), cfg.step_size, cfg.norm_bound)
    _set_rng_state(start, device)
    with perturb.perturbing():
        for d in perturb.all():
            d.requires_grad_(False)  # the final pass trains the parameters, not δ
        adv = forward()
    norm = perturb.max_norm()
    perturb.reset()
    return {
        **clean,
        "loss": clean["loss"] + cfg.weight * adv["loss"],
        "losses": {**clean["losses"], "adv": adv["loss"].detach()},
        "metrics": {**clean["metrics"], "adv_delta_norm": norm.detach()},
    }


__all__ = ["AdversarialConfig", "EmbeddingPerturbation", "adversarial_forward"]

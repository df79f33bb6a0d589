"""DALL-E's discrete VAE (Ramesh et al. 2021, §2.1): image -> grid of codebook tokens -> image.

Shapes: B batch, C image channels (3), H/W image side, K codebook entries, h/w token-grid side
(H / downsample), N = h*w tokens, c conv width, e codebook vector size.

Training relaxes the categorical choice of each cell with the Gumbel-softmax (Jang et al. 2017;
Maddison et al. 2017): z = softmax((logits + Gumbel noise) / tau), and the decoder reads the
z-weighted mix of the codebook vectors. tau follows a cosine from `temperature_start` to
`temperature_end` over `anneal_steps` training forwards (the paper anneals 1 -> 1/16). The count of
training forwards is a long buffer, so it is checkpointed with the weights and a resumed run
continues the schedule where it stopped. Evaluation and stage 2 encode with argmax (hard tokens).

The paper's encoder/decoder are ResNets; here a strided conv per halving plus one residual block,
which is enough for the shapes world and trains on a CPU.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.blocks import Blocks
from models.config import ImageSpec, ModelConfig, MoEConfig, TextSpec
from models.encoders.base import Encoder, EncoderOutputs
from models.generative_config import DVAEConfig, image_problems
from models.objectives.sampling import uniform

DVAE_OUTPUTS = frozenset({"dvae_logits", "dvae_recon", "dvae_codes", "dvae_tau", "dvae_kl_weight",
                          "moe_aux", "moe_counts"})


class _ResBlock(nn.Module):
    """x + Conv(ReLU(Conv(ReLU(x)))): the residual unit of the paper's encoder and decoder."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x_BcHW: Tensor) -> Tensor:
        return x_BcHW + self.conv2(F.relu(self.conv1(F.relu(x_BcHW))))


class DiscreteVAE(nn.Module):
    """encode(image) -> logits [B,K,h,w]; decode(z [B,K,h,w] one-hot or relaxed) -> image [B,C,H,W]."""

    def __init__(self, cfg: DVAEConfig, channels: int = 3) -> None:
        super().__init__()
        self.cfg = cfg
        c, K = cfg.channels, cfg.codebook_size
        down: list[nn.Module] = [nn.Conv2d(channels, c, 3, padding=1)]
        for _ in range(cfg.halvings):
            down += [nn.Conv2d(c, c, 4, stride=2, padding=1), nn.ReLU(), _ResBlock(c)]
        down += [nn.ReLU(), nn.Conv2d(c, K, 1)]
        self.encoder = nn.Sequential(*down)
        self.codebook_Ke = nn.Parameter(torch.empty(K, cfg.codebook_dim))
        up: list[nn.Module] = [nn.Conv2d(cfg.codebook_dim, c, 1)]
        for _ in range(cfg.halvings):
            up += [_ResBlock(c), nn.ConvTranspose2d(c, c, 4, stride=2, padding=1), nn.ReLU()]
        up += [nn.Conv2d(c, channels, 3, padding=1)]
        self.decoder = nn.Sequential(*up)
        # Training forwards so far (the temperature and beta schedules read it); long: never cast to bf16.
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.reset_special_parameters()

    def reset_special_parameters(self) -> None:
        """Convolutions keep PyTorch's Kaiming-uniform init (models.weights' BERT init of std 0.02 is
        for transformers; it would shrink a conv stack's signal layer by layer); codebook ~ N(0, 1)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                m.reset_parameters()
        with torch.no_grad():
            self.codebook_Ke.normal_()

    def encode(self, image_BCHW: Tensor) -> Tensor:
        """Codebook logits [B, K, h, w]."""
        return self.encoder(image_BCHW)

    def codes(self, image_BCHW: Tensor) -> Tensor:
        """Hard tokens long [B, N] (argmax, row-major over the grid): what stage 2 models."""
        return self.encode(image_BCHW).argmax(1).flatten(1)

    def decode(self, z_BKhw: Tensor) -> Tensor:
        """Image [B, C, H, W] from per-cell weights over the codebook (one-hot or relaxed)."""
        e_Behw = torch.einsum("bkhw,ke->behw", z_BKhw, self.codebook_Ke.to(z_BKhw.dtype))
        return self.decoder(e_Behw)

    def decode_codes(self, codes_BN: Tensor) -> Tensor:
        """Image [B, C, H, W] from hard tokens long [B, N] (N a square)."""
        side = math.isqrt(codes_BN.shape[1])
        one_hot = F.one_hot(codes_BN, self.cfg.codebook_size).view(codes_BN.shape[0], side, side, -1)
        return self.decode(one_hot.permute(0, 3, 1, 2).to(self.codebook_Ke.dtype))

    def temperature(self, step: int | Tensor | None = None) -> Tensor:
        """tau at `step` (default: the training forwards so far): cosine from start to end (DALL-E §2.1)."""
        s = self.updates if step is None else torch.as_tensor(step)
        frac = (s.float() / self.cfg.anneal_steps).clamp(max=1.0)
        lo, hi = self.cfg.temperature_end, self.cfg.temperature_start
        return lo + (hi - lo) * 0.5 * (1 + torch.cos(math.pi * frac))

    def kl_weight(self, step: int | Tensor | None = None) -> Tensor:
        """beta at `step`: linear warm-up from 0 (the paper's ramp), then constant."""
        s = (self.updates if step is None else torch.as_tensor(step)).float()
        ramp = (s / self.cfg.kl_warmup_steps).clamp(max=1.0) if self.cfg.kl_warmup_steps else torch.ones(())
        return self.cfg.kl_weight * ramp

    def relax(self, logits_BKhw: Tensor, tau: Tensor, generator: torch.Generator | None) -> Tensor:
        """Gumbel-softmax sample over K per cell: soft as the paper trains, or straight-through."""
        u = uniform(tuple(logits_BKhw.shape), logits_BKhw.device, generator).clamp(1e-9, 1 - 1e-9)
        gumbel = -torch.log(-torch.log(u))
        soft = torch.softmax((logits_BKhw.float() + gumbel) / tau.to(logits_BKhw.device), dim=1)
        if self.cfg.straight_through:  # forward: the one-hot sample; backward: the relaxed one's gradient
            hard = F.one_hot(soft.argmax(1), soft.shape[1]).permute(0, 3, 1, 2).to(soft.dtype)
            soft = hard + soft - soft.detach()
        return soft.to(logits_BKhw.dtype)


class DVAEEncoder(Encoder):
    """The dVAE as a pretrainer's encoder (preset `dvae`): no text, no transformer, no MoE.

    Outputs: dvae_logits [B,K,h,w], dvae_recon [B,C,H,W], dvae_codes long [B,N], dvae_tau [],
    dvae_kl_weight [], moe_aux 0, moe_counts None.
    """

    CAN_PROVIDE = DVAE_OUTPUTS

    def __init__(self, cfg: ModelConfig, blocks: Blocks, moe: MoEConfig, text: TextSpec, image: ImageSpec,
                 needs: frozenset[str] | None = None) -> None:
        nn.Module.__init__(self)  # no text embeddings or visual input: the base's parts are not used
        self._visual_name = None
        self._num_moe = None
        problems = image_problems(cfg.dvae, image.size)
        if problems:
            raise ValueError("; ".join(problems))
        self.vae = DiscreteVAE(cfg.dvae, image.channels)
        self.provides = DVAE_OUTPUTS
        self.tokens_per_sample = cfg.dvae.grid(image.size) ** 2

    def num_visual_tokens(self, inputs: Mapping[str, Tensor]) -> int:
        return self.tokens_per_sample

    def forward(self, inputs: Mapping[str, Tensor], *, visual_mask_BP: Tensor | None = None,
                causal_text: bool = False, generator: torch.Generator | None = None,
                want: frozenset[str] | None = None) -> EncoderOutputs:
        image_BCHW = inputs["image"]
        logits_BKhw = self.vae.encode(image_BCHW)
        tau, beta = self.vae.temperature(), self.vae.kl_weight()
        if self.training:
            z_BKhw = self.vae.relax(logits_BKhw, tau, generator)
            if torch.is_grad_enabled():  # a training forward: the schedules advance
                self.vae.updates += 1
        else:  # hard tokens: the reconstruction stage 2's decoder will produce
            z_BKhw = F.one_hot(logits_BKhw.argmax(1), logits_BKhw.shape[1]).permute(0, 3, 1, 2).to(logits_BKhw.dtype)
        return {
            "dvae_logits": logits_BKhw,
            "dvae_recon": self.vae.decode(z_BKhw),
            "dvae_codes": logits_BKhw.argmax(1).flatten(1),
            "dvae_tau": tau.detach(),
            "dvae_kl_weight": beta.detach(),
            "moe_aux": image_BCHW.new_zeros((), dtype=torch.float32),
            "moe_counts": None,
        }


__all__ = ["DVAE_OUTPUTS", "DVAEEncoder", "DiscreteVAE"]

"""The dVAE objective (DALL-E §2.1): reconstruction + beta * KL(q(z | x) || uniform prior).

Shapes: B batch, C channels, H/W image side, K codebook entries, h/w token grid.

The ELBO of the paper with a uniform prior over the K codes of every cell: KL(q || U) =
sum_k q_k (log q_k + log K), averaged over cells (0 when the encoder is maximally unsure, log K
when it is certain). Mean squared error in the pipeline's normalised pixel scale stands in for the
paper's logit-Laplace likelihood. The loss term `dvae` = MSE + beta * KL, beta from model.dvae
(kl_weight, warm-up kl_warmup_steps).

Metrics: `dvae_recon_mse` (the reconstruction error; with argmax tokens in evaluation, i.e. the
images stage 2 can produce), `dvae_kl` (unweighted), `dvae_beta`, `dvae_tau` (temperature), `dvae_codes_used` (share of the K codes that
are some cell's argmax in this batch) and `dvae_perplexity` (exp of the entropy of the batch's code
histogram: K = every code equally used, 1 = collapse).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from models.objectives.base import Objective, ObjectiveContext, require


def kl_to_uniform(logits_BKhw: Tensor) -> Tensor:
    """Mean over cells of KL(softmax(logits) || uniform over K), in nats (fp32)."""
    log_q = torch.log_softmax(logits_BKhw.float(), dim=1)
    return (log_q.exp() * (log_q + math.log(logits_BKhw.shape[1]))).sum(1).mean()


def code_usage(codes_BN: Tensor, K: int) -> tuple[Tensor, Tensor]:
    """(share of codes used, perplexity of the code histogram) of a batch of hard tokens."""
    counts_K = torch.bincount(codes_BN.flatten(), minlength=K).float()
    p_K = counts_K / counts_K.sum().clamp(min=1)
    entropy = -(p_K * torch.log(p_K.clamp(min=1e-12))).sum()
    return (counts_K > 0).float().mean(), entropy.exp()


class DVAELoss(Objective):
    name: ClassVar[str] = "dvae"
    view: ClassVar[str] = "clean"
    requires: ClassVar[frozenset[str]] = frozenset({"dvae_logits", "dvae_recon", "dvae_codes", "dvae_tau",
                                                     "dvae_kl_weight"})

    def __init__(self, ctx: ObjectiveContext) -> None:
        super().__init__(ctx)

    def forward(
        self, outputs: Mapping[str, Tensor | None], view_batch: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        logits_BKhw = require(outputs, "dvae_logits")
        recon = F.mse_loss(require(outputs, "dvae_recon").float(), view_batch["image"].float())
        kl = kl_to_uniform(logits_BKhw)
        used, perplexity = code_usage(require(outputs, "dvae_codes"), logits_BKhw.shape[1])
        beta = require(outputs, "dvae_kl_weight")
        return ({"dvae": recon + beta * kl},
                {"dvae_recon_mse": recon.detach(), "dvae_kl": kl.detach(), "dvae_beta": beta,
                 "dvae_tau": require(outputs, "dvae_tau"),
                 "dvae_codes_used": used, "dvae_perplexity": perplexity})

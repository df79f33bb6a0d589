"""What MoE layers report: per-layer expert load, drops, auxiliary losses, router entropy.

Each `MoEFFN` is a `ReportsMoEStats`: it keeps `last_stats` (a `MoEStats` of detached tensors from its
latest forward) and accumulates the stats of its training-mode forwards until `collect_stats` reads
them. `collect_stats(model)` walks the model's ReportsMoEStats modules (the MoE layers) in module order (i = 0, 1, ... counts MoE
layers only, the same order as the rows of `moe_counts`) and returns, averaged over the training
forwards since the previous call (several views or micro-batches of one step):

    moe/layer{i}/load      list[float], E values summing to 1: share of the layer's routes (token ->
                           expert assignments of real tokens, after GShard's random routing, before
                           the capacity cut) that chose each expert; uniform = 1/E
    moe/layer{i}/dropped   float: share of those routes dropped by expert capacity (0 when dropless);
                           for top-1 gates, the share of tokens that skipped the layer's experts
    moe/layer{i}/aux       float: the gate's balancing loss, unweighted (switch/gshard: E * sum f_e P_e,
                           1.0 when balanced; noisy_topk: CV^2(importance) + CV^2(load), 0 when balanced)
    moe/layer{i}/z_loss    float: router z-loss mean(logsumexp(logits)^2), unweighted (always computed)
    moe/layer{i}/entropy   float: mean router entropy over real tokens, nats (ln E = uniform router)
    moe/layer{i}/skipped_text, skipped_image
                           float: share of the layer's real text / image tokens that no expert
                           processed (they pass on the residual only: Switch's "dropped tokens"; for
                           top-1 gates the same as `dropped`, for expert choice the only kind of drop);
                           present once the encoder has told the layer its tokens' modality
    moe/dropped            float: mean of moe/layer{i}/dropped over the layers
    moe/skipped_text, moe/skipped_image   float: the same over all layers' tokens

The loss that training adds is the weighted one (`moe.aux_loss_weight * aux + moe.z_loss_weight *
z_loss`), which each MoEFFN returns from its forward. A train loop averages these values over its
micro-batches and ranks (`load` element-wise) and puts them in each report;
orchestrator/report/expert_load.py turns the reports into a table and a heatmap.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from models.metric_keys import MOE, moe_layer_key
from models.moe.routing import Routing

# Token modalities the encoders tell their MoE layers (MoETally.modality): index = the code.
MODALITIES = ("text", "image")
TEXT, IMAGE = 0, 1


@dataclass
class MoEStats:
    """Detached stats of one forward (or a sum of several, inside MoEFFN's accumulator).

    load_E [E] fp32 (fractions), dropped/aux/z_loss/entropy/tokens fp32 scalars; skipped_M / seen_M
    [2] fp32 counts of real tokens skipped / seen, by modality (text, image).
    """

    load_E: Tensor
    dropped: Tensor
    aux: Tensor
    z_loss: Tensor
    entropy: Tensor
    tokens: Tensor
    skipped_M: Tensor
    seen_M: Tensor

    @classmethod
    def of(cls, r: Routing, modality_N: Tensor | None = None) -> MoEStats:
        """`modality_N` long [N] (0 text, 1 image) of the routed tokens; None = not known."""
        wanted = r.wanted_E.float()
        total = wanted.sum()
        kept = r.counts_E.sum().float()
        skipped_M = seen_M = torch.zeros(2, device=wanted.device)
        if modality_N is not None:
            skipped_M = torch.zeros(2, device=wanted.device).index_add_(0, modality_N, r.skipped_N.float())
            seen_M = torch.zeros(2, device=wanted.device).index_add_(0, modality_N, r.used_N.float())
        return cls(
            load_E=wanted / total.clamp(min=1),
            dropped=torch.where(total > 0, 1.0 - kept / total.clamp(min=1), torch.zeros_like(total)),
            aux=r.losses["aux"].detach().float(),
            z_loss=r.losses["z_loss"].detach().float(),
            entropy=r.entropy.detach().float(),
            tokens=r.tokens.detach().float(),
            skipped_M=skipped_M,
            seen_M=seen_M,
        )

    def __add__(self, other: MoEStats) -> MoEStats:
        return MoEStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def scaled(self, factor: float) -> MoEStats:
        return MoEStats(*(getattr(self, f.name) * factor for f in fields(self)))


class ReportsMoEStats:
    """What a MoE layer (models/moe/layer.py's MoEFFN) mixes in to be found by `collect_stats`:
    `last_stats`, and the window of its training forwards' stats since the last read."""

    last_stats: MoEStats | None = None
    _window: MoEStats | None = None
    _window_n: int = 0

    def record_stats(self, stats: MoEStats, training: bool) -> None:
        self.last_stats = stats
        if training:
            self._window = stats if self._window is None else self._window + stats
            self._window_n += 1

    def window_stats(self, reset: bool = True) -> MoEStats | None:
        """Mean stats of the training forwards since the last reset, else `last_stats`."""
        if self._window is None:
            return self.last_stats
        out = self._window.scaled(1.0 / self._window_n)
        if reset:
            self._window, self._window_n = None, 0
        return out


def collect_stats(module: nn.Module, reset: bool = True) -> dict[str, float | list[float]]:
    """Flat `moe/...` metrics of every MoE layer in `module` (see the module docstring); {} if none.

    Averages each layer's training forwards since the last call (falls back to `last_stats` when
    there were none, e.g. after an eval-only forward) and, with `reset`, starts a new window.
    One host transfer for all layers.
    """
    layers = [m for m in module.modules() if isinstance(m, ReportsMoEStats)]
    per_layer = [m.window_stats(reset=reset) for m in layers]
    present = [(i, s) for i, s in enumerate(per_layer) if s is not None]
    if not present:
        return {}
    flat = torch.cat([torch.cat([s.load_E, torch.stack([s.dropped, s.aux, s.z_loss, s.entropy]), s.skipped_M,
                                 s.seen_M]) for _, s in present]).tolist()
    out: dict[str, float | list[float]] = {}
    pos = 0
    skipped, seen = [0.0, 0.0], [0.0, 0.0]
    for i, s in present:
        E = s.load_E.numel()
        out[moe_layer_key(i, "load")] = flat[pos:pos + E]
        for j, name in enumerate(("dropped", "aux", "z_loss", "entropy")):
            out[moe_layer_key(i, name)] = flat[pos + E + j]
        for m, modality in enumerate(MODALITIES):
            layer_skipped, layer_seen = flat[pos + E + 4 + m], flat[pos + E + 6 + m]
            if layer_seen > 0:
                out[moe_layer_key(i, f"skipped_{modality}")] = layer_skipped / layer_seen
            skipped[m] += layer_skipped
            seen[m] += layer_seen
        pos += E + 8
    dropped = [out[moe_layer_key(i, "dropped")] for i, _ in present]
    out[f"{MOE}dropped"] = sum(dropped) / len(dropped)  # type: ignore[arg-type]
    for m, modality in enumerate(MODALITIES):
        if seen[m] > 0:
            out[f"{MOE}skipped_{modality}"] = skipped[m] / seen[m]
    return out

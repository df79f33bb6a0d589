"""DALL-E's transformer (Ramesh et al. 2021, §2.2): one causal decoder over [text; image tokens].

Shapes: B batch, T text positions (text.max_len), N image tokens (h*w, the dVAE grid), n image
tokens given so far, S = T + n sequence, D model dim, V text vocabulary, K codebook entries.

The caption is padded to T positions and stays in the sequence: a padded position embeds as the
[PAD] row (zero) plus its own position vector, which is the paper's "special padding token unique
to each of the text positions". Image tokens come from a frozen dVAE (argmax codes), embedded with
their own table plus row and column embeddings. Every token attends causally to all tokens before
it (SDPA's is_causal, no mask): text sees earlier text, the image sees the whole caption and the
earlier image tokens. The layers are the shared pre-LN blocks, so `moe.layers` turns their FFNs into
MoE layers as in every other preset (depth index = layer index).

Outputs (see base.py for the MoE keys):
    text_logits  [B,T-1,V]  position t predicts text token t+1
    text_labels  [B,T-1]    long: the next text token, IGNORE_INDEX where it is padding
    image_logits [B,N,K]    position T-1+i predicts image token i (the last text slot predicts the first)
    image_codes  [B,N]      long: the dVAE tokens of the image (the targets)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.blocks import Blocks
from models.config import ImageSpec, ModelConfig, MoEConfig, TextSpec
from models.encoders.base import Encoder, EncoderOutputs
from models.encoders.dvae import DiscreteVAE
from models.encoders.layers import Allow, MoETally, run_stack, stack
from models.generative_config import image_problems
from models.moe.stats import IMAGE, TEXT
from models.objectives.base import IGNORE_INDEX
from models.objectives.sampling import multinomial

DALLE_OUTPUTS = frozenset({"text_logits", "text_labels", "image_logits", "image_codes", "moe_aux", "moe_counts"})


class DalleDecoder(Encoder):
    """The stage-2 model; `vae` is frozen (no gradient, always in eval mode), loaded by jobs/ from
    the dVAE run (jobs/generative/frozen_dvae.py)."""

    CAN_PROVIDE = DALLE_OUTPUTS

    def __init__(self, cfg: ModelConfig, blocks: Blocks, moe: MoEConfig, text: TextSpec, image: ImageSpec,
                 needs: frozenset[str] | None = None) -> None:
        super().__init__(cfg, blocks, text, image, with_visual=False)
        problems = image_problems(cfg.dvae, image.size)
        if problems:
            raise ValueError("; ".join(problems))
        D, K, side = cfg.hidden_size, cfg.dvae.codebook_size, cfg.dvae.grid(image.size)
        self.text = text
        self.grid = side
        self.num_image_tokens = side * side
        self.vae = DiscreteVAE(cfg.dvae, image.channels).requires_grad_(False)
        self.image_embed = nn.Embedding(K, D)
        self.row_hD = nn.Parameter(torch.zeros(side, D))
        self.col_wD = nn.Parameter(torch.zeros(side, D))
        self.image_type_D = nn.Parameter(torch.zeros(D))
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = stack(cfg, moe, blocks.joint)
        self.norm = nn.LayerNorm(D)
        self.text_head = nn.Linear(D, text.vocab_size)
        self.image_head = nn.Linear(D, K)
        self.provides = DALLE_OUTPUTS

    def train(self, mode: bool = True) -> DalleDecoder:
        super().train(mode)
        self.vae.eval()  # frozen: the tokenizer behaves the same in training and evaluation
        return self

    def num_visual_tokens(self, inputs: Mapping[str, Tensor]) -> int:
        return self.num_image_tokens

    def pad_text(self, input_ids_BT: Tensor, attention_mask_BT: Tensor) -> tuple[Tensor, Tensor]:
        """Right-pad (or refuse) the caption to the T = text.max_len positions the image follows."""
        T = self.text.max_len
        extra = T - input_ids_BT.shape[1]
        if extra < 0:
            raise ValueError(f"caption has {input_ids_BT.shape[1]} tokens, more than text.max_len={T}")
        return (F.pad(input_ids_BT, (0, extra), value=self.text.pad_id), F.pad(attention_mask_BT, (0, extra)))

    @torch.no_grad()
    def tokenize_image(self, image_BCHW: Tensor) -> Tensor:
        """The frozen dVAE's argmax tokens, long [B, N]."""
        return self.vae.codes(image_BCHW.to(self.vae.codebook_Ke.dtype))

    def _hidden(self, ids_BT: Tensor, mask_BT: Tensor, codes_Bn: Tensor) -> tuple[Tensor, MoETally]:
        """Final states [B, T+n, D] of the causal decoder over [text; first n image tokens]."""
        B, T = ids_BT.shape
        n = codes_Bn.shape[1]
        x_text = self.text_embeddings(ids_BT)
        pos_ND = (self.row_hD[:, None, :] + self.col_wD[None, :, :]).reshape(-1, self.row_hD.shape[1])[:n]
        x_img = self.dropout(self.image_embed(codes_Bn) + pos_ND + self.image_type_D)
        x_BSD = torch.cat([x_text, x_img.to(x_text.dtype)], dim=1)
        keep_BS = torch.cat([mask_BT.bool(), mask_BT.new_ones(B, n, dtype=torch.bool)], dim=1)
        modality_S = torch.cat([torch.full((T,), TEXT), torch.full((n,), IMAGE)]).to(ids_BT.device)
        tally = MoETally(x_BSD)
        with tally.within(modality_S):
            x_BSD = run_stack(self.layers, x_BSD, Allow(None, causal=True), keep_BS, tally)
        return self.norm(x_BSD), tally

    def forward(self, inputs: Mapping[str, Tensor], *, visual_mask_BP: Tensor | None = None,
                causal_text: bool = False, generator: torch.Generator | None = None,
                want: frozenset[str] | None = None) -> EncoderOutputs:
        ids_BT, mask_BT = self.pad_text(inputs["input_ids"], inputs["attention_mask"])
        codes_BN = inputs.get("image_codes")
        if codes_BN is None:
            codes_BN = self.tokenize_image(inputs["image"])
        T = ids_BT.shape[1]
        # The last image token is only ever a target: the decoder reads tokens 0..N-2.
        h_BSD, tally = self._hidden(ids_BT, mask_BT, codes_BN[:, :-1])
        next_BT = torch.where(mask_BT[:, 1:].bool(), ids_BT[:, 1:], torch.full_like(ids_BT[:, 1:], IGNORE_INDEX))
        return {
            "text_logits": self.text_head(h_BSD[:, : T - 1]),
            "text_labels": next_BT,
            "image_logits": self.image_head(h_BSD[:, T - 1:]),
            "image_codes": codes_BN,
            **tally.outputs(),
        }

    @torch.no_grad()
    def generate(self, input_ids_BT: Tensor, attention_mask_BT: Tensor, *, top_k: int = 0,
                 temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """Sample the N image tokens of each caption, long [B, N]: one token at a time, each from
        softmax(logits / temperature) restricted to the top_k most likely codes (0 = all).
        Draws only from `generator`, so a seed fixes the samples. Runs in eval mode (no dropout)."""
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0")
        was_training = self.training
        self.eval()
        ids_BT, mask_BT = self.pad_text(input_ids_BT, attention_mask_BT)
        codes_Bn = ids_BT.new_zeros(ids_BT.shape[0], 0)
        for _ in range(self.num_image_tokens):
            # The whole prefix each step (no KV cache): N is a few dozen tokens in the shapes world.
            h_BSD, _ = self._hidden(ids_BT, mask_BT, codes_Bn)
            logits_BK = self.image_head(h_BSD[:, -1]).float() / temperature
            if 0 < top_k < logits_BK.shape[1]:
                kth_B1 = logits_BK.topk(top_k, dim=1).values[:, -1:]
                logits_BK = logits_BK.masked_fill(logits_BK < kth_B1, float("-inf"))
            probs_BK = torch.softmax(logits_BK, dim=1)
            next_B1 = multinomial(probs_BK, generator).to(codes_Bn.device)
            codes_Bn = torch.cat([codes_Bn, next_B1], dim=1)
        self.train(was_training)
        return codes_Bn

    @torch.no_grad()
    def decode(self, codes_BN: Tensor) -> Tensor:
        """Images [B, C, H, W] (the pipeline's normalised scale, about [-1, 1]) from image tokens."""
        return self.vae.decode_codes(codes_BN)


__all__ = ["DALLE_OUTPUTS", "DalleDecoder"]

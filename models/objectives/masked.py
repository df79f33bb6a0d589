"""Masked language modelling conditioned on the image (BERT; ViLT/UNITER's MLM), and its variants
that choose what to mask differently: segments (InterBERT's MSM) and whole words (BERT's WWM).

Shapes: B batch, T text tokens, D model dim, V vocabulary, N masked tokens in the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import ClassVar

import torch
from torch import Tensor, nn

from models.config import TextSpec
from models.objectives.base import (
    IGNORE_INDEX,
    Objective,
    ObjectiveContext,
    cross_entropy_and_accuracy,
    encoder_inputs,
    require,
)
from models.objectives.sampling import randint, uniform


def special_ids(text: TextSpec) -> tuple[int, ...]:
    """Token ids that are never masked nor drawn as random replacements.

    [UNK] is among them: asking the model to predict "unknown word" teaches it nothing.
    """
    return tuple(sorted({text.pad_id, text.unk_id, text.cls_id, text.sep_id, text.mask_id}))


def mask_tokens(
    input_ids_BT: Tensor,
    attention_mask_BT: Tensor,
    text: TextSpec,
    prob: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT masking (Devlin et al. 2019, §3.1): returns (masked_ids_BT, labels_BT).

    Each non-special, non-padding token is selected with probability `prob`; a selected token
    becomes [MASK] 80 % of the time, a random non-special token 10 %, and stays itself 10 % (so the
    model cannot assume an unmasked token is correct). Labels are the original ids at selected
    positions and IGNORE_INDEX elsewhere.
    """
    device = input_ids_BT.device
    shape = tuple(input_ids_BT.shape)
    eligible_BT = maskable(input_ids_BT, attention_mask_BT, text)
    selected_BT = eligible_BT & (uniform(shape, device, generator) < prob)
    # One draw splits the selected tokens 80/10/10.
    how_BT = uniform(shape, device, generator)
    return corrupt(input_ids_BT, selected_BT, how_BT, text, generator)


def maskable(input_ids_BT: Tensor, attention_mask_BT: Tensor, text: TextSpec) -> Tensor:
    """bool [B, T]: real (non-padding), non-special tokens: the ones a masking scheme may pick."""
    specials = torch.tensor(special_ids(text), device=input_ids_BT.device)
    return attention_mask_BT.bool() & ~torch.isin(input_ids_BT, specials)


def corrupt(
    input_ids_BT: Tensor, selected_BT: Tensor, how_BT: Tensor, text: TextSpec,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT's 80/10/10 on the selected tokens: (masked_ids_BT, labels_BT).

    A selected token becomes [MASK] where how < 0.8, a random non-special token where
    0.8 <= how < 0.9, and stays itself otherwise; `how_BT` is U[0, 1), drawn per token or shared by
    the tokens of one unit (a span, a word). Labels: the original id where selected, else IGNORE_INDEX.
    """
    device = input_ids_BT.device
    specials = torch.tensor(special_ids(text), device=device)
    labels_BT = torch.where(selected_BT, input_ids_BT, torch.full_like(input_ids_BT, IGNORE_INDEX))
    vocab_V = torch.arange(text.vocab_size, device=device)
    candidates = vocab_V[~torch.isin(vocab_V, specials)]
    random_BT = candidates[randint(0, candidates.numel(), tuple(input_ids_BT.shape), device, generator)]
    masked_BT = torch.where(selected_BT & (how_BT < 0.8), torch.full_like(input_ids_BT, text.mask_id), input_ids_BT)
    masked_BT = torch.where(selected_BT & (how_BT >= 0.8) & (how_BT < 0.9), random_BT, masked_BT)
    return masked_BT, labels_BT


def masked_text_view(
    batch: Mapping[str, Tensor], text: TextSpec, generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """Masked caption + its own image; adds `mlm_labels` [B,T].

    Masked losses are computed on matched pairs only (UNITER, Chen et al. 2020, §3.1): predicting a
    word from an unrelated image would teach the model to ignore the image.
    """
    return _masked_view(mask_tokens, batch, text, generator)


def _masked_view(masker: Callable[..., tuple[Tensor, Tensor]], batch: Mapping[str, Tensor], text: TextSpec,
                 generator: torch.Generator | None) -> dict[str, Tensor]:
    """The batch's encoder inputs with the caption masked by `masker`, plus its `mlm_labels` [B,T]."""
    view = encoder_inputs(batch)
    view["input_ids"], view["mlm_labels"] = masker(batch["input_ids"], batch["attention_mask"], text,
                                                   generator=generator)
    return view


class MLMHead(nn.Module):
    """BERT's prediction head: Linear + GELU + LayerNorm, then a decoder tied to the word embeddings.

    Tying (Press & Wolf 2017) shares the [V, D] matrix with the input embeddings: fewer parameters
    and a better-conditioned output layer. The decoder keeps its own per-token bias.
    """

    def __init__(self, hidden_size: int, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.transform = nn.Linear(hidden_size, hidden_size)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(hidden_size)
        self.decoder = nn.Linear(hidden_size, word_embeddings.num_embeddings)
        self.decoder.weight = word_embeddings.weight

    def forward(self, h_ND: Tensor) -> Tensor:
        return self.decoder(self.norm(self.act(self.transform(h_ND))))


class TokenPrediction(Objective):
    """Word pieces predicted from the text states by BERT's LM head (`MLMHead`), at the positions
    `view_batch[labels_key]` labels: masked tokens (MLM and its variants), the next token
    (captioning), scene-graph words. Loss and accuracy under the objective's name."""

    labels_key: ClassVar[str]
    requires: ClassVar[frozenset[str]] = frozenset({"text_hidden"})

    def __init__(self, ctx: ObjectiveContext) -> None:
        super().__init__(ctx)
        self.head = MLMHead(ctx.hidden_size, ctx.word_embeddings)

    def predict(self, outputs: Mapping[str, Tensor | None], view_batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(logits [N, V], labels [N]) at the N labelled positions."""
        labels_BT = view_batch[self.labels_key]
        selected_BT = labels_BT != IGNORE_INDEX
        # Decode the labelled positions only: the [N, V] logits are ~7x smaller than [B, T, V].
        return self.head(require(outputs, "text_hidden")[selected_BT]), labels_BT[selected_BT]

    def forward(
        self, outputs: Mapping[str, Tensor | None], view_batch: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        loss, acc = cross_entropy_and_accuracy(*self.predict(outputs, view_batch))
        return {self.name: loss}, {f"{self.name}_acc": acc}


class MaskedLanguageModeling(TokenPrediction):
    """BERT's MLM on the caption, its image in view. Subclasses (msm, mlm_wwm) mask other units
    with the same head and loss; evaluation's MLM probe (jobs/evaluate.py) serves all of them."""

    name: ClassVar[str] = "mlm"
    view: ClassVar[str] = "masked_text"
    labels_key: ClassVar[str] = "mlm_labels"


SPAN_GEOMETRIC_P = 0.2  # SpanBERT's span-length distribution (mean ~3.8 words after clipping)
SPAN_MAX_LEN = 10


def mask_spans(
    input_ids_BT: Tensor,
    attention_mask_BT: Tensor,
    text: TextSpec,
    prob: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Segment masking: returns (masked_ids_BT, labels_BT) like `mask_tokens`, but whole runs of
    consecutive words are masked (InterBERT's masked segment modelling, Lin et al. 2020, §3.2: a
    masked word's neighbours must not give it away). Span lengths ~ Geometric(0.2) clipped to 10
    (SpanBERT, Joshi et al. 2020, §3.1), spans start at a uniform non-special position and stop at
    the first special/padding token, until round(prob * words) tokens of the sample are masked
    (the last span clipped to the budget). Each span as a whole is replaced by [MASK] 80 %, random
    tokens 10 %, kept 10 % (SpanBERT's span-level 80/10/10)."""
    device = input_ids_BT.device
    B, T = input_ids_BT.shape
    eligible_BT = maskable(input_ids_BT, attention_mask_BT, text)
    selected_BT = torch.zeros_like(eligible_BT)
    how_BT = torch.zeros(B, T, device=device)
    for b in range(B):
        positions = eligible_BT[b].nonzero().flatten().tolist()
        budget = round(prob * len(positions))
        done = 0
        for _ in range(4 * T):  # bounded: a start inside an existing span adds nothing
            if done >= budget:
                break
            u = float(uniform((2,), device, generator)[0])
            length = min(SPAN_MAX_LEN, 1 + int(torch.log(torch.tensor(1 - u)) / torch.log(torch.tensor(1 - SPAN_GEOMETRIC_P))))
            start = positions[int(randint(0, len(positions), (1,), device, generator))]
            how = float(uniform((1,), device, generator))
            t = start
            while t < T and eligible_BT[b, t] and length > 0 and done < budget:
                if not selected_BT[b, t]:
                    selected_BT[b, t] = True
                    how_BT[b, t] = how
                    done += 1
                length -= 1
                t += 1
    return corrupt(input_ids_BT, selected_BT, how_BT, text, generator)


def masked_segments_view(
    batch: Mapping[str, Tensor], text: TextSpec, generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """Segment-masked caption + its own image; adds `mlm_labels` [B,T] (matched pairs only)."""
    return _masked_view(mask_spans, batch, text, generator)


class MaskedSegmentModeling(MaskedLanguageModeling):
    """InterBERT's MSM: MLM's head and loss on segment-masked captions (`mask_spans`)."""

    name: ClassVar[str] = "msm"
    view: ClassVar[str] = "masked_segments"


def word_owner(input_ids_BT: Tensor, eligible_BT: Tensor, text: TextSpec) -> Tensor:
    """long [B, T]: the position of the first piece of the word each eligible token belongs to, -1
    elsewhere. A WordPiece continuation piece (`text.continuation_ids`, "##...") belongs to the word
    before it; one that follows a special token or padding starts a word of its own. Without
    continuation ids every token is a word."""
    B, T = input_ids_BT.shape
    device = input_ids_BT.device
    continuation_BT = torch.isin(input_ids_BT, torch.tensor(text.continuation_ids, device=device, dtype=torch.long))
    after_eligible_BT = torch.cat([torch.zeros(B, 1, dtype=torch.bool, device=device), eligible_BT[:, :-1]], 1)
    start_BT = eligible_BT & ~(continuation_BT & after_eligible_BT)
    position_BT = torch.arange(T, device=device).expand(B, T)
    owner_BT = torch.where(start_BT, position_BT, torch.full_like(position_BT, -1)).cummax(dim=1).values
    return torch.where(eligible_BT, owner_BT, torch.full_like(owner_BT, -1))


def mask_words(
    input_ids_BT: Tensor,
    attention_mask_BT: Tensor,
    text: TextSpec,
    prob: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Whole-word masking: returns (masked_ids_BT, labels_BT) like `mask_tokens`, but the unit is
    the word (BERT's whole-word masking: Devlin et al. 2019, the models google-research/bert released
    on 2019-05-31): a word's WordPiece continuation pieces ("##...") are masked together with its
    first piece, so the model cannot recover a masked piece from the rest of its own word
    (BERT's README: "phil [MASK] ##mon" gives "philammon" away; "[MASK] [MASK] [MASK]" does not).

    Each word (`word_owner`) is selected with probability `prob`; a selected word is replaced by
    [MASK] pieces 80 % of the time, by random non-special pieces 10 %, and kept 10 %, one draw per
    word so its pieces are treated alike. (Google's script fills a per-sequence budget of
    round(0.15 * tokens) with whole words and draws 80/10/10 per piece; independent per-word draws
    match `mask_tokens`' per-token ones and give the same 15 % of words on average.)
    """
    shape = tuple(input_ids_BT.shape)
    device = input_ids_BT.device
    eligible_BT = maskable(input_ids_BT, attention_mask_BT, text)
    owner_BT = word_owner(input_ids_BT, eligible_BT, text).clamp(min=0)
    # Every token reads its word's draws (the draws at the word's first piece).
    selected_BT = eligible_BT & (uniform(shape, device, generator).gather(1, owner_BT) < prob)
    how_BT = uniform(shape, device, generator).gather(1, owner_BT)
    return corrupt(input_ids_BT, selected_BT, how_BT, text, generator)


def masked_words_view(
    batch: Mapping[str, Tensor], text: TextSpec, generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """Whole-word-masked caption + its own image; adds `mlm_labels` [B,T] (matched pairs only)."""
    return _masked_view(mask_words, batch, text, generator)


class WholeWordMasking(MaskedLanguageModeling):
    """BERT's whole-word masking (`mask_words`): MLM's head and loss on whole-word-masked captions.

    Needs the tokenizer's continuation pieces (`TextSpec.continuation_ids`, filled from a WordPiece
    tokenizer's "##" tokens): without them it would silently be token-level MLM.
    """

    name: ClassVar[str] = "mlm_wwm"
    view: ClassVar[str] = "masked_words"

    @classmethod
    def text_problems(cls, text: TextSpec) -> list[str]:
        if text.continuation_ids:
            return []
        return [f"objective {cls.name!r} needs the tokenizer's word-continuation pieces (TextSpec.continuation_ids, "
                "the '##' tokens of a WordPiece tokenizer), and this tokenizer has none"]

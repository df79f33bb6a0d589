"""Objectives and views: BERT masking rates, ITM pair construction, loss values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import TextSpec
from models.objectives import (
    IGNORE_INDEX,
    OBJECTIVES,
    VIEWS,
    MaskedLanguageModeling,
    ObjectiveContext,
    itm_pairs_view,
    mask_tokens,
    masked_text_view,
)
from models.objectives.base import cross_entropy_and_accuracy

TEXT = TextSpec(vocab_size=50, max_len=12)
SPECIALS = torch.tensor([TEXT.pad_id, TEXT.unk_id, TEXT.cls_id, TEXT.sep_id, TEXT.mask_id])


def captions(n: int, T: int = 12, seed: int = 0) -> tuple[Tensor, Tensor]:
    """[CLS] words [SEP] [PAD]...; some [UNK] among the words; lengths 4..T."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, TEXT.vocab_size, (n, T), generator=g)
    ids[torch.rand(n, T, generator=g) < 0.05] = TEXT.unk_id
    ids[:, 0] = TEXT.cls_id
    mask = torch.ones(n, T, dtype=torch.long)
    for i, length in enumerate(torch.randint(4, T + 1, (n,), generator=g).tolist()):
        ids[i, length - 1] = TEXT.sep_id
        ids[i, length:] = TEXT.pad_id
        mask[i, length:] = 0
    return ids, mask


def test_registries() -> None:
    assert set(OBJECTIVES) >= {"mlm", "itm"}
    for name, cls in OBJECTIVES.items():
        assert cls.name == name and cls.view in VIEWS


def test_mask_tokens_rates() -> None:
    ids, mask = captions(20_000)
    masked, labels = mask_tokens(ids, mask, TEXT, generator=torch.Generator().manual_seed(0))
    eligible = mask.bool() & ~torch.isin(ids, SPECIALS)
    selected = labels != IGNORE_INDEX
    assert abs(selected.sum() / eligible.sum() - 0.15) < 0.01
    n = selected.sum()
    to_mask = (masked == TEXT.mask_id) & selected
    kept = (masked == ids) & selected
    random = selected & ~to_mask & ~kept
    assert abs(to_mask.sum() / n - 0.8) < 0.02
    assert abs(random.sum() / n - 0.1) < 0.02
    assert abs(kept.sum() / n - 0.1) < 0.02
    # random replacements are never special tokens
    assert not torch.isin(masked[random], SPECIALS).any()


def test_mask_tokens_never_touches_specials_or_padding() -> None:
    ids, mask = captions(5_000)
    masked, labels = mask_tokens(ids, mask, TEXT, prob=0.9)
    protected = ~mask.bool() | torch.isin(ids, SPECIALS)
    assert (labels[protected] == IGNORE_INDEX).all()
    assert torch.equal(masked[protected], ids[protected])
    # labels hold the original token; nothing outside the selection changes
    selected = labels != IGNORE_INDEX
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(masked[~selected], ids[~selected])


def test_mask_tokens_is_reproducible_with_a_generator() -> None:
    ids, mask = captions(64)
    a = mask_tokens(ids, mask, TEXT, generator=torch.Generator().manual_seed(7))
    b = mask_tokens(ids, mask, TEXT, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_masked_text_view_keeps_the_matched_image() -> None:
    ids, mask = captions(8)
    batch = {
        "image": torch.randn(8, 3, 4, 4),
        "input_ids": ids,
        "attention_mask": mask,
        "sample_id": torch.arange(8),
    }
    view = masked_text_view(batch, TEXT)
    assert set(view) == {"image", "input_ids", "attention_mask", "mlm_labels"}
    assert view["image"] is batch["image"]


def image_batch(ids: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Image i is filled with the value i, so a view's image tells which sample it came from."""
    n = ids.shape[0]
    image = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 4, 4).clone()
    return {"image": image, "input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("n", [8, 7])
def test_itm_half_the_pairs_are_mismatched_with_another_image(n: int) -> None:
    ids, mask = captions(n)  # distinct captions
    batch = image_batch(ids, mask)
    g = torch.Generator().manual_seed(0)
    matched = []
    for _ in range(500):
        view = itm_pairs_view(batch, TEXT, g)
        source = view["image"][:, 0, 0, 0].long()
        own = source == torch.arange(n)
        assert torch.equal(view["itm_labels"], own.long())  # label 0 <=> the image is another's
        assert torch.equal(view["input_ids"], ids)  # text untouched
        matched.append(view["itm_labels"].float().mean())
    assert abs(torch.stack(matched).mean() - 0.5) < 0.02


def test_itm_swap_with_an_identical_caption_is_labelled_matched() -> None:
    ids, mask = captions(1)
    ids, mask = ids.expand(6, -1).clone(), mask.expand(6, -1).clone()
    batch = image_batch(ids, mask)
    view = itm_pairs_view(batch, TEXT, torch.Generator().manual_seed(0))
    swapped = view["image"][:, 0, 0, 0].long() != torch.arange(6)
    assert swapped.sum() == 3
    assert (view["itm_labels"] == 1).all()


def test_itm_swap_with_another_caption_of_the_same_image_is_labelled_matched() -> None:
    """COCO: five captions per image; a caption paired with its image from another row is a match."""
    ids, mask = captions(6)
    batch = {**image_batch(ids, mask), "image_id": torch.tensor([7, 7, 7, 9, 9, 9])}
    view = itm_pairs_view(batch, TEXT, torch.Generator().manual_seed(0))
    source = view["image"][:, 0, 0, 0].long()  # which row's image each caption now has
    assert (source != torch.arange(6)).sum() == 3
    same_image = batch["image_id"][source] == batch["image_id"]
    assert view["itm_labels"].tolist() == same_image.long().tolist()
    assert (same_image & (source != torch.arange(6))).any() and not same_image.all()  # both kinds of swap


def test_itm_single_sample_batch_stays_matched() -> None:
    ids, mask = captions(1)
    view = itm_pairs_view(image_batch(ids, mask), TEXT)
    assert view["itm_labels"].tolist() == [1]


def test_cross_entropy_of_perfect_logits_is_zero() -> None:
    labels = torch.tensor([3, IGNORE_INDEX, 7, 12, IGNORE_INDEX])
    logits = 100.0 * F.one_hot(labels.clamp(min=0), TEXT.vocab_size).float()
    loss, acc = cross_entropy_and_accuracy(logits, labels)
    assert loss.item() < 1e-6 and acc.item() == 1.0


def test_cross_entropy_without_labels_is_zero_not_nan() -> None:
    logits = torch.randn(0, 5, requires_grad=True)
    loss, acc = cross_entropy_and_accuracy(logits, torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0 and acc.item() == 0.0
    loss.backward()


def test_mlm_objective_of_a_perfect_predictor_is_zero() -> None:
    V = TEXT.vocab_size
    mlm = MaskedLanguageModeling(
        ObjectiveContext(hidden_size=V, text=TEXT, word_embeddings=nn.Embedding(V, V))
    )

    class Perfect(nn.Module):  # hidden state = one-hot of the answer -> confident, right logits
        def forward(self, h_NV: Tensor) -> Tensor:
            return 100.0 * h_NV

    mlm.head = Perfect()
    ids, mask = captions(16)
    _, labels = mask_tokens(ids, mask, TEXT, prob=0.5)
    hidden = F.one_hot(labels.clamp(min=0), V).float()
    losses, metrics = mlm({"text_hidden": hidden}, {"mlm_labels": labels})
    assert losses["mlm"].item() < 1e-6
    assert metrics["mlm_acc"].item() == 1.0
    # and a wrong predictor is penalised
    losses, _ = mlm({"text_hidden": hidden.roll(1, dims=-1)}, {"mlm_labels": labels})
    assert losses["mlm"].item() > 10

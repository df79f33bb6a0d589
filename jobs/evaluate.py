"""Held-out evaluation inside the Ray Train workers: ITM accuracy, retrieval, MLM accuracy.

Legend: K candidate-set size (= eval batch size), T tokens, N eval samples of all ranks, E joint
embedding dim, M masked tokens.

Metrics (keys of the returned dict; the train loop prefixes `eval/`):
- ITM models: `itm_acc`, `i2t_r{1,5,10}` / `t2i_r{1,5,10}` over candidate sets of K, `chance_r1`,
  `candidates` (K).
- ITC models (CLIP-style embeddings): `itc_i2t_r{1,5,10}` / `itc_t2i_r{1,5,10}` over the WHOLE
  eval set, COCO's protocol: every rank embeds its share, the embeddings (and image ids) are
  all-gathered; each distinct image queries all captions (a hit when any of its captions ranks in
  the top r: all five of COCO's count), each caption queries all distinct images; hit counts are
  summed over ranks. `itc_candidates` (captions in the pool), `itc_images`, `captions_per_image`,
  `itc_chance_r1` (= `itc_i2t_chance_r1`), `itc_t2i_chance_r1`.
- MLM models (any objective of the MLM family: mlm, msm, mlm_wwm; the probe masks tokens as mlm
  does and decodes with that objective's head): with one fixed-seed masking per batch (the same
  masks with and without the image), `mlm_token_acc` (all masked tokens), `mlm_grounded_acc`
  (masked tokens that are visually grounded words: the dataset card's `grounded_words`, its object
  names; ids given by the caller), and the text-only control `mlm_blind_acc` /
  `mlm_blind_grounded_acc`: the same masks with the image blanked (pixels zero, every visual token
  masked, scene labels dropped); `mlm_grounding_gain` = grounded minus blind grounded accuracy,
  what looking at the image buys.
- DALL-E models, when `captions` decodes token ids and `generate_samples` > 0: images generated for
  the first eval captions, judged against them on the shapes world (jobs/generative/probe.py:
  `gen_match_rate` and its random / real / shuffled references, `dvae_recon_mse`); dVAE models: their
  argmax reconstructions of the first eval images judged the same way (`recon_match_rate`).

Retrieval ranks, for each image of an eval batch, the K captions of that batch by ITM score
(image-to-text), and for each caption the K images (text-to-image): R@1 over candidate sets of K,
the protocol ViLT and UNITER use when full-set ITM scoring is too expensive (K^2 forwards).
The ground truth is the image id (`image_id`, else the sample id), never the caption text: a
caption is right for every row showing its image (COCO: five captions per image all count), and
an identical caption written for another image is not.

Every rank evaluates its equal share of the split and the counts are summed across ranks, so the
figures cover the whole held-out subset. All ranks run the same number of forwards, which MoE's
all-to-all requires.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from jobs import collectives
from jobs.data.batch import to_model_batch
from models.encoders.base import CONTRASTIVE
from models.objectives import MaskedLanguageModeling, masked_text_view
from models.objectives.base import IGNORE_INDEX, IMAGE_COLUMNS, encoder_inputs

RECALL_AT = (1, 5, 10)
MLM_EVAL_SEED = 1234  # fixed masks: runs and the with/without-image passes see the same ones


def grounded_token_ids(tokenizer_uri: str, words: Sequence[str], storage: Any = None) -> tuple[int, ...]:
    """Token ids of the dataset's visually grounded words (its dataset card's `grounded_words`: the
    object names, jobs.data.datasets), every word piece of each, specials excluded; () for none."""
    from jobs.data.tokenizer import load_tokenizer

    if not words:
        return ()
    tok = load_tokenizer(tokenizer_uri, storage)
    special = {t for t in (tok.token_to_id(n) for n in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")) if t is not None}
    ids: set[int] = set()
    for word in words:
        ids.update(tok.encode(word, add_special_tokens=False).ids)
    return tuple(sorted(ids - special))


def _image_ids(batch: dict[str, torch.Tensor], offset: int) -> torch.Tensor:
    """[K] which image each sample's caption describes: `image_id` (COCO: five captions share one),
    else the sample's own id; a batch without either gets ids unique to this rank and batch."""
    for key in ("image_id", "sample_id"):
        if key in batch:
            return batch[key].long()
    K = batch["input_ids"].shape[0]
    rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
    return -1 - (torch.arange(K, device=batch["input_ids"].device) + offset + rank * (1 << 40))


def _same_image(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[K, K] bool: sample i's caption describes sample j's image: the retrieval ground truth."""
    ids_K = _image_ids(batch, 0)
    return ids_K[:, None] == ids_K[None, :]


@torch.no_grad()
def evaluate(model: Any, batches: Iterable[dict[str, torch.Tensor]], *, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32, max_batches: int | None = None,
             grounded_ids: Sequence[int] = (), captions: Callable[[Tensor], list[str]] | None = None,
             generate_samples: int = 0) -> dict[str, float]:
    """Metrics over `batches` (each of K samples), summed over ranks when distributed.

    Counts are kept as device tensors and read back once, by the final all-reduce."""
    was_training = model.training
    model.eval()
    objectives = getattr(model, "objectives", {})
    has_itm = "itm" in objectives
    has_itc = "text_embed" in getattr(getattr(model, "encoder", None), "provides", frozenset())
    mlm = _mlm_objective(objectives)
    grounded = torch.tensor(sorted(set(grounded_ids)), dtype=torch.long, device=device)
    embeds: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    sums: dict[str, float | Tensor] = {}
    from jobs.generative.probe import PROBE_SEED, probe_for

    probe = probe_for(model)  # DALL-E: generated images judged; dVAE: its reconstructions
    to_judge = generate_samples if captions is not None and probe is not None else 0

    def add(name: str, value: float | Tensor) -> None:
        if isinstance(value, Tensor):
            value = value.detach().float()
        sums[name] = sums.get(name, 0.0) + value

    for i, raw in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        batch = to_model_batch(raw, device, dtype)
        out = model(batch)
        add("batches", 1)
        add("samples", batch["input_ids"].shape[0])
        add("loss", out["loss"])
        for name, value in out["metrics"].items():
            add(name, value)
        if has_itm:
            _retrieval(model, batch, add)
        if has_itc:
            out_enc = model.encoder(encoder_inputs(batch), want=CONTRASTIVE)
            ids_K = _image_ids(batch, offset=i * batch["input_ids"].shape[0])
            embeds.append((out_enc["image_embed"].float(), out_enc["text_embed"].float(), ids_K))
        if mlm is not None:
            _mlm_probe(model, mlm, batch, grounded, add, seed=MLM_EVAL_SEED + i)
        if to_judge > 0 and probe is not None and captions is not None:
            to_judge -= probe(model, batch, captions, add, limit=to_judge, seed=PROBE_SEED + i)
    if has_itc:
        _itc_retrieval(embeds, add, device)
    if was_training:
        model.train()
    return _reduce(sums, device)


def _recall_counts(hit_QN: torch.Tensor, scores_QN: torch.Tensor, prefix: str, add: Any) -> None:
    """For each query row, whether any correct item is among its top r by score."""
    ranked_QN = scores_QN.argsort(dim=1, descending=True)
    for r in RECALL_AT:
        top = ranked_QN[:, : min(r, ranked_QN.shape[1])]
        add(f"{prefix}_r{r}", hit_QN.gather(1, top).any(1).sum())


def _itc_retrieval(embeds: list[tuple[Tensor, Tensor, Tensor]], add: Any, device: torch.device | str) -> None:
    """Full eval-set retrieval with the joint embeddings, COCO's protocol (Karpathy & Fei-Fei 2015):
    every distinct image (by image id) queries all captions and is right when ANY of its captions
    ranks in the top r; every caption queries all distinct images. Each rank ranks its own queries
    against every rank's items (all-gathered); an image is queried by the rank holding its first row."""
    if not embeds:
        return
    image_NE = torch.cat([e[0] for e in embeds])
    text_NE = torch.cat([e[1] for e in embeds])
    ids_N = torch.cat([e[2] for e in embeds]).to(image_NE.device)
    n = ids_N.shape[0]
    all_image_ME = collectives.all_gather_rows(image_NE, device)
    all_text_ME = collectives.all_gather_rows(text_NE, device)
    all_ids_M = collectives.all_gather_rows(ids_N, device)
    counts = collectives.all_gather_rows(torch.tensor([n], device=device), device)
    rank = torch.distributed.get_rank() if collectives.world_size() > 1 else 0
    start = int(counts[:rank].sum())
    M = all_ids_M.shape[0]
    _, inverse_M = torch.unique(all_ids_M, return_inverse=True)
    first_U = torch.full((int(inverse_M.max()) + 1,), M, dtype=torch.long, device=all_ids_M.device).scatter_reduce(
        0, inverse_M, torch.arange(M, device=all_ids_M.device), reduce="amin")
    is_first_M = torch.zeros(M, dtype=torch.bool, device=all_ids_M.device)
    is_first_M[first_U] = True
    U = first_U.shape[0]
    # image -> text: this rank's rows that are their image's first, against all M captions
    query_N = is_first_M[start:start + n]
    hit_QM = ids_N[query_N][:, None] == all_ids_M[None, :]
    _recall_counts(hit_QM, image_NE[query_N] @ all_text_ME.T, "itc_i2t", add)
    add("itc_image_queries", query_N.sum())
    add("itc_i2t_chance_r1", (hit_QM.sum(1).float() / M).sum())
    # text -> image: every caption of this rank against the U distinct images
    hit_NU = ids_N[:, None] == all_ids_M[first_U][None, :]
    _recall_counts(hit_NU, text_NE @ all_image_ME[first_U].T, "itc_t2i", add)
    add("itc_text_queries", n)
    add("itc_t2i_chance_r1", n / U)
    add("itc_pool_captions", float(M) * n)  # so the reduced means are M and U
    add("itc_pool_images", float(U) * n)


def _mlm_objective(objectives: Any) -> MaskedLanguageModeling | None:
    """The objective whose head the MLM probe decodes with: `mlm`, else the first of its family."""
    family = [o for o in objectives.values() if isinstance(o, MaskedLanguageModeling)]
    return objectives["mlm"] if "mlm" in objectives else (family[0] if family else None)


def _blank(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text-only control: pixels zero, scene classes dropped (no object tags, no real regions)."""
    out = dict(batch)
    out["image"] = torch.zeros_like(batch["image"])
    for key in ("obj_labels", "region_labels"):
        if key in out:
            out[key] = torch.full_like(out[key], -1)
    if "region_feats" in out:
        out["region_feats"] = torch.zeros_like(out["region_feats"])
    return out


def _mlm_predictions(model: Any, mlm: MaskedLanguageModeling, view: dict[str, torch.Tensor],
                     blind: bool) -> torch.Tensor:
    """[M] predicted ids at the masked positions of `view`."""
    encoder = model.encoder
    visual_mask = None
    if blind and getattr(encoder, "_visual_name", None) is not None:
        P = encoder.num_visual_tokens(view)
        visual_mask = torch.ones(view["input_ids"].shape[0], P, dtype=torch.bool, device=view["input_ids"].device)
    hidden_BTD = encoder(view, visual_mask_BP=visual_mask, want=frozenset({"text_hidden"}))["text_hidden"]
    selected_BT = view["mlm_labels"] != IGNORE_INDEX
    return mlm.head(hidden_BTD[selected_BT]).argmax(-1)


def _mlm_probe(model: Any, mlm: MaskedLanguageModeling, batch: dict[str, torch.Tensor], grounded: torch.Tensor,
               add: Any, seed: int) -> None:
    """MLM accuracy overall / on grounded words, with the image and with it blanked (same masks)."""
    generator = torch.Generator().manual_seed(seed)
    view = masked_text_view(batch, model.text, generator)
    labels_M = view["mlm_labels"][view["mlm_labels"] != IGNORE_INDEX]
    is_grounded_M = torch.isin(labels_M, grounded)
    add("mlm_tokens", labels_M.numel())
    add("mlm_grounded_tokens", is_grounded_M.sum())
    for prefix, blind in (("mlm", False), ("mlm_blind", True)):
        source = {**_blank(batch), **{k: view[k] for k in ("input_ids", "mlm_labels")}} if blind else view
        correct_M = _mlm_predictions(model, mlm, source, blind) == labels_M
        add(f"{prefix}_correct", correct_M.sum())
        add(f"{prefix}_grounded_correct", (correct_M & is_grounded_M).sum())


def _retrieval(model: Any, batch: dict[str, torch.Tensor], add: Any) -> None:
    image, ids, mask = batch["image"], batch["input_ids"], batch["attention_mask"]
    k = ids.shape[0]
    # row i = image i against every caption j; the image's boxes/region features travel with it
    visual = {c: batch[c].repeat_interleave(k, 0) for c in IMAGE_COLUMNS if c in batch and c != "image"}
    scores_KK = model.itm_logits(image.repeat_interleave(k, 0), ids.repeat(k, 1), mask.repeat(k, 1), visual)
    scores_KK = scores_KK.float().view(k, k)
    same_KK = _same_image(batch)
    _recall_counts(same_KK, scores_KK, "i2t", add)  # row i: the captions ranked for image i
    _recall_counts(same_KK.T, scores_KK.T, "t2i", add)  # row j: the images ranked for caption j
    rows = torch.arange(k, device=scores_KK.device)
    # ITM accuracy on a balanced set: every true pair, and one shifted (mostly mismatched) pair each
    shifted = (rows + 1) % k
    pos_ok = scores_KK[rows, rows] > 0
    neg_label = same_KK[rows, shifted]
    neg_ok = (scores_KK[rows, shifted] > 0) == neg_label
    add("itm_correct", pos_ok.sum() + neg_ok.sum())
    add("itm_pairs", 2 * k)
    add("retrieval_queries", k)
    add("chance_r1", (same_KK.sum(1).float() / k).sum())


_COUNTS = ("batches", "samples", "itm_correct", "itm_pairs", "retrieval_queries", "itc_image_queries",
           "itc_text_queries", "itc_pool_captions", "itc_pool_images", "mlm_tokens", "mlm_grounded_tokens")


def _reduce(raw: dict[str, float | Tensor], device: torch.device | str) -> dict[str, float]:
    sums = collectives.all_reduce_dict(raw, device)  # one collective, one read-back
    keys = sorted(sums)
    n = max(sums.get("batches", 0.0), 1.0)
    out: dict[str, float] = {}
    for k in keys:
        if k in _COUNTS or k.startswith(("i2t", "t2i", "chance", "itc_i2t", "itc_t2i", "itc_chance", "gen_")) \
                or k.endswith(("_hits", "_samples")):  # the image probes' sums (jobs/generative/probe.py)
            continue
        if k.startswith("mlm") and (k.endswith("_correct")):
            continue
        out[k] = sums[k] / n  # per-batch means: loss and the objectives' metrics
    q = sums.get("retrieval_queries", 0.0)
    if q:
        for k in keys:
            if k.startswith(("i2t", "t2i")):
                out[k] = sums[k] / q
        out["chance_r1"] = sums["chance_r1"] / q
        out["itm_acc"] = sums["itm_correct"] / sums["itm_pairs"]
        out["candidates"] = float(round(q / n))
    iq, tq = sums.get("itc_image_queries", 0.0), sums.get("itc_text_queries", 0.0)
    if tq:
        for k in keys:
            if k.startswith("itc_i2t"):
                out[k] = sums[k] / max(iq, 1.0)
            elif k.startswith("itc_t2i"):
                out[k] = sums[k] / tq
        out["itc_chance_r1"] = out["itc_i2t_chance_r1"]
        out["itc_candidates"] = float(round(sums["itc_pool_captions"] / tq))  # captions each image ranks
        out["itc_images"] = float(round(sums["itc_pool_images"] / tq))
        out["captions_per_image"] = out["itc_candidates"] / max(out["itc_images"], 1.0)
    m, g = sums.get("mlm_tokens", 0.0), sums.get("mlm_grounded_tokens", 0.0)
    if "mlm_correct" in sums:
        out["mlm_token_acc"] = sums["mlm_correct"] / max(m, 1.0)
        out["mlm_blind_acc"] = sums["mlm_blind_correct"] / max(m, 1.0)
        out["mlm_grounded_tokens"] = g
        if g:
            out["mlm_grounded_acc"] = sums["mlm_grounded_correct"] / g
            out["mlm_blind_grounded_acc"] = sums["mlm_blind_grounded_correct"] / g
            out["mlm_grounding_gain"] = out["mlm_grounded_acc"] - out["mlm_blind_grounded_acc"]
    from jobs.generative.probe import reduce_probe

    reduce_probe(sums, out)
    out["samples"] = sums.get("samples", 0.0)
    return out

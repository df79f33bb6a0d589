"""WordPiece tokenizer (HF `tokenizers`) for captions, BERT-style, with fixed special-token ids.

The model side (models.config.TextSpec) hard-codes pad=0, unk=1, cls=2, sep=3, mask=4 so that
masking and padding need no tokenizer at train time; `text_spec` is where that is checked.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from jobs.storage import StorageOptions, read_text, write_text
from models.config import TextSpec

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0..4, in this order
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(5)


def _bert_tokenizer(vocab: dict[str, int] | None = None) -> Tokenizer:
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def train_tokenizer(captions: Iterable[str], vocab_size: int = 2000) -> Tokenizer:
    """Train a lower-casing BERT-style WordPiece tokenizer whose encodings are "[CLS] ... [SEP]".

    The result is deterministic for given captions. HF's trainer on its own is not
    (huggingface/tokenizers#1794): it numbers "##x" continuation tokens in hash-map order and
    breaks merge ties by id, so one corpus gives different vocabularies run to run. Passing every
    "##x" in as a (temporary) special token fixes their ids up front; the tokenizer is then
    rebuilt from the vocabulary with only the real special tokens.
    """
    texts = list(captions)
    normalizer = normalizers.BertNormalizer(lowercase=True)
    chars = sorted({c for t in texts for c in normalizer.normalize_str(t) if not c.isspace()})
    continuations = [f"##{c}" for c in chars]
    # The trainer adds special tokens first, in list order, which is what pins SPECIAL_TOKENS to 0..4.
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + continuations, show_progress=False
    )
    scratch = _bert_tokenizer()
    scratch.train_from_iterator(texts, trainer=trainer)
    tok = _bert_tokenizer(scratch.get_vocab(with_added_tokens=True))
    tok.add_special_tokens(SPECIAL_TOKENS)  # already in the vocab: ids unchanged
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", CLS_ID), ("[SEP]", SEP_ID)],
    )
    return tok


def save_tokenizer(tok: Tokenizer, uri: str, options: StorageOptions | None = None) -> None:
    """Write tokenizer.json to any URI (local or s3://)."""
    write_text(uri, tok.to_str(), options)


def load_tokenizer(uri: str, options: StorageOptions | None = None) -> Tokenizer:
    """The tokenizer at `uri`; ValueError when the file is not a Hugging Face tokenizer.json."""
    text = read_text(uri, options)
    try:
        return Tokenizer.from_str(text)
    except Exception as exc:  # noqa: BLE001 - the Rust side raises a bare Exception for any parse error
        reason = " ".join(str(exc).split())[:120]
        raise ValueError(f"not a Hugging Face tokenizer.json ({reason})") from None


def encode(tok: Tokenizer, texts: Sequence[str], max_len: int, pad_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize a batch to fixed-length arrays: (input_ids int64 [B, max_len], attention_mask int64 [B, max_len]).

    Sequences are "[CLS] tokens [SEP]"; longer ones are cut to keep [SEP] last, shorter ones are
    padded with the tokenizer's pad id. Truncation and padding are done here rather than with
    tok.enable_truncation/enable_padding, because those mutate a tokenizer other callers share.
    """
    if max_len < 2:
        raise ValueError(f"max_len={max_len} leaves no room for [CLS] and [SEP]; need >= 2")
    if tok.truncation is not None or tok.padding is not None:
        # Someone configured this instance; work on a clean copy so our lengths are the only ones.
        tok = Tokenizer.from_str(tok.to_str())
        tok.no_truncation()
        tok.no_padding()
    encodings = tok.encode_batch(list(texts), add_special_tokens=True)
    if pad_id is None:
        # Only the pad id is needed: a few vocabulary look-ups, not the full TextSpec (whose
        # continuation ids scan the whole vocabulary: 6.8 ms a call at 30k words).
        pad_id = special_ids(tok)["pad_id"]
    input_ids = np.full((len(encodings), max_len), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(encodings), max_len), dtype=np.int64)
    for row, enc in enumerate(encodings):
        ids = enc.ids
        if len(ids) > max_len:
            ids = ids[: max_len - 1] + ids[-1:]  # the post-processor's [SEP] stays last
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


# Names of each special token across tokenizer families (BERT WordPiece, RoBERTa/CLIP BPE, T5).
_SPECIAL_ALIASES: dict[str, tuple[str, ...]] = {
    "pad_id": ("[PAD]", "<pad>", "<|pad|>"),
    "unk_id": ("[UNK]", "<unk>", "<|unk|>"),
    "cls_id": ("[CLS]", "<s>", "<|startoftext|>", "[BOS]", "<bos>"),
    "sep_id": ("[SEP]", "</s>", "<|endoftext|>", "[EOS]", "<eos>"),
    "mask_id": ("[MASK]", "<mask>", "<|mask|>"),
}


def special_ids(tok: Tokenizer) -> dict[str, int]:
    """{pad_id, unk_id, cls_id, sep_id, mask_id}: each special token looked up by its usual names
    (a handful of hash look-ups, independent of the vocabulary size)."""
    ids: dict[str, int] = {}
    for field, names in _SPECIAL_ALIASES.items():
        found = next((i for i in (tok.token_to_id(n) for n in names) if i is not None), None)
        if found is None:
            raise ValueError(f"the tokenizer has no {field[:-3]} token (looked for {', '.join(names)}); "
                             "MLM needs [PAD] [UNK] [CLS] [SEP] [MASK] or their <pad>/<s>/<mask> equivalents")
        ids[field] = found
    return ids


def text_spec(tok: Tokenizer, max_len: int, scene_words: Mapping[str, Sequence[str]] | None = None) -> TextSpec:
    """The TextSpec for any HF tokenizer: its special-token ids, looked up by their usual names, its
    word-continuation pieces, and (given `scene_words`, node type -> words, e.g.
    jobs.data.synth.SCENE_GRAPH_WORDS) the token ids of each scene-graph node type."""
    ids = special_ids(tok)
    scene = scene_word_ids(tok, scene_words or {}, frozenset(ids.values()))
    return TextSpec(vocab_size=tok.get_vocab_size(with_added_tokens=True), max_len=max_len, **ids,
                    continuation_ids=continuation_ids(tok),
                    scene_object_ids=scene.get("object", ()), scene_attribute_ids=scene.get("attribute", ()),
                    scene_relation_ids=scene.get("relation", ()))


def continuation_ids(tok: Tokenizer) -> tuple[int, ...]:
    """Ids of the pieces that continue a word (WordPiece's "##ing"): the vocabulary entries that
    start with the model's continuing-subword prefix. () for a model without one (byte-level BPE
    marks word starts instead, so its pieces cannot be told this way)."""
    prefix = getattr(tok.model, "continuing_subword_prefix", None)
    if not prefix:
        return ()
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    return tuple(sorted(i for t, i in tok.get_vocab(with_added_tokens=True).items()
                        if t.startswith(prefix) and len(t) > len(prefix) and t not in special))


def scene_word_ids(tok: Tokenizer, words: Mapping[str, Sequence[str]], specials: frozenset[int] = frozenset()
                   ) -> dict[str, tuple[int, ...]]:
    """Node type -> the token ids of its words, every piece of each word. A word the tokenizer
    cannot spell (it encodes to an unknown token) is left out, and so is a piece that two types
    share: it would not say which kind of node it is."""
    unk = tok.token_to_id("[UNK]") if tok.token_to_id("[UNK]") is not None else tok.token_to_id("<unk>")
    found: dict[str, set[int]] = {}
    for kind, kind_words in words.items():
        found[kind] = set()
        for word in kind_words:
            pieces = tok.encode(word, add_special_tokens=False).ids
            if pieces and unk not in pieces:
                found[kind].update(i for i in pieces if i not in specials)
    shared = {i for a in found for b in found if a < b for i in found[a] & found[b]}
    return {kind: tuple(sorted(ids - shared)) for kind, ids in found.items()}

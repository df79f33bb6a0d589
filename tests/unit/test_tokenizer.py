"""jobs.data.tokenizer: WordPiece with pinned special ids, fixed-length batches, save/load anywhere."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models

from jobs.data.tokenizer import (
    SPECIAL_TOKENS,
    encode,
    load_tokenizer,
    save_tokenizer,
    text_spec,
    train_tokenizer,
)
from jobs.storage import StorageOptions

CAPTIONS = [
    "A small red circle left of a large blue square",
    "a large green triangle above a small purple diamond",
    "a small yellow square below a large orange circle and a small blue diamond right of the small yellow square",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(CAPTIONS * 10, vocab_size=500)


def test_special_ids_pinned(tok: Tokenizer) -> None:
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    spec = text_spec(tok, max_len=32)
    assert (spec.pad_id, spec.unk_id, spec.cls_id, spec.sep_id, spec.mask_id) == (0, 1, 2, 3, 4)
    assert spec.vocab_size == tok.get_vocab_size() and spec.max_len == 32


def test_training_deterministic() -> None:
    """HF's trainer alone gives a different vocab each time here (huggingface/tokenizers#1794)."""
    corpus = [
        f"{a} {b}{c} {c}{a}" for a in ("red", "blue", "ring") for b in ("ox", "box") for c in ("ab", "ba")
    ]
    assert len({train_tokenizer(corpus, vocab_size=300).to_str() for _ in range(6)}) == 1


def test_only_real_special_tokens(tok: Tokenizer) -> None:
    added = {t.content for t in tok.get_added_tokens_decoder().values()}
    assert added == set(SPECIAL_TOKENS)  # the "##x" tokens pinned during training are ordinary
    assert tok.encode("red", add_special_tokens=False).tokens == ["red"]
    assert tok.encode("circles", add_special_tokens=False).tokens == ["circle", "##s"]


def test_round_trip_lowercased(tok: Tokenizer) -> None:
    ids, mask = encode(tok, CAPTIONS, max_len=32)
    for row, text in enumerate(CAPTIONS):
        n = int(mask[row].sum())
        assert ids[row, 0] == 2 and ids[row, n - 1] == 3  # [CLS] ... [SEP]
        assert tok.decode(ids[row, :n].tolist()) == text.lower()


def test_padding_and_truncation_shapes(tok: Tokenizer) -> None:
    ids, mask = encode(tok, ["a red circle", CAPTIONS[2]], max_len=8)
    assert ids.shape == mask.shape == (2, 8)
    assert ids.dtype == mask.dtype == np.int64
    assert mask[0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    assert ids[0, 5:].tolist() == [0, 0, 0]
    assert mask[1].tolist() == [1] * 8
    assert ids[1, -1] == 3  # truncated, [SEP] kept last
    assert tok.decode(ids[1].tolist()) == "a small yellow square below a"


def test_encode_ignores_and_keeps_shared_settings(tok: Tokenizer) -> None:
    shared = Tokenizer.from_str(tok.to_str())
    shared.enable_padding(length=20)
    ids, _ = encode(shared, ["a red circle"], max_len=6)
    assert ids.shape == (1, 6)
    assert shared.padding is not None and shared.padding["length"] == 20  # caller's state untouched
    assert tok.truncation is None and tok.padding is None


def test_unknown_word_maps_to_unk(tok: Tokenizer) -> None:
    ids, _ = encode(tok, ["zebra"], max_len=6)
    assert 1 in ids[0].tolist()


def test_max_len_too_small(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="max_len=1 leaves no room"):
        encode(tok, ["a"], max_len=1)


def test_text_spec_reads_any_tokenizers_special_ids() -> None:
    # BERT-style ids that are not 0..4, and a RoBERTa-style naming: both map by name
    bert = Tokenizer(models.WordPiece(vocab={"[UNK]": 100, "[PAD]": 0, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103,
                                             "a": 5}, unk_token="[UNK]"))
    spec = text_spec(bert, max_len=8)
    assert (spec.pad_id, spec.unk_id, spec.cls_id, spec.sep_id, spec.mask_id) == (0, 100, 101, 102, 103)
    roberta = Tokenizer(models.WordPiece(vocab={"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4, "a": 5},
                                         unk_token="<unk>"))
    spec = text_spec(roberta, max_len=8)
    assert (spec.pad_id, spec.unk_id, spec.cls_id, spec.sep_id, spec.mask_id) == (1, 3, 0, 2, 4)
    ids, mask = encode(roberta, ["a"], max_len=4)
    assert ids[0, -1] == 1 and mask[0].tolist() == [1, 0, 0, 0]  # padded with <pad>=1, not 0


def test_text_spec_fills_continuation_pieces_and_scene_words() -> None:
    from jobs.data.synth import SCENE_GRAPH_WORDS

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4, "red": 5, "circle": 6, "tri": 7,
             "##angle": 8, "left": 9, "of": 10, "##s": 11, "small": 12, "##": 13}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    spec = text_spec(tok, max_len=8, scene_words=SCENE_GRAPH_WORDS)
    assert spec.continuation_ids == (8, 11)  # "##angle", "##s"; a bare "##" continues nothing
    assert spec.scene_object_ids == (6, 7, 8)  # circle, tri ##angle; square/diamond spell [UNK]: left out
    assert spec.scene_attribute_ids == (5, 12)
    assert spec.scene_relation_ids == (9,)  # "of" is no relation word
    plain = text_spec(tok, max_len=8)
    assert plain.continuation_ids == (8, 11) and plain.scene_ids == ((), (), ())
    # byte-level BPE has no continuation prefix: nothing is claimed
    bpe = Tokenizer(models.BPE(vocab={"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}, merges=[],
                               unk_token="[UNK]"))
    assert text_spec(bpe, max_len=8).continuation_ids == ()


def test_text_spec_names_a_missing_special_token() -> None:
    vocab = {"[UNK]": 0, "[PAD]": 1, "[CLS]": 2, "[SEP]": 3, "a": 5}
    bad = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    with pytest.raises(ValueError, match=r"the tokenizer has no mask token \(looked for \[MASK\], <mask>"):
        text_spec(bad, max_len=8)


def test_save_load_local_and_s3(tok: Tokenizer, tmp_path: Path, s3_server) -> None:
    local = str(tmp_path / "tok" / "tokenizer.json")
    save_tokenizer(tok, local)
    assert load_tokenizer(local).to_str() == tok.to_str()
    bucket = s3_server.create_bucket()
    opts = StorageOptions(endpoint_url=s3_server.endpoint_url)
    save_tokenizer(tok, f"s3://{bucket}/tokenizer.json", opts)
    loaded = load_tokenizer(f"s3://{bucket}/tokenizer.json", opts)
    assert encode(loaded, CAPTIONS, 16)[0].tolist() == encode(tok, CAPTIONS, 16)[0].tolist()


def test_encode_with_a_30k_vocabulary_never_scans_the_vocabulary(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 14.5: without a pad id, encode used to build the whole TextSpec per call (its
    continuation ids walk all 30k entries: 6.8 ms a call). Now the pad id is a name look-up."""
    import time

    import jobs.data.tokenizer as tokenizer
    from benchmarks.tokenize import big_tokenizer, captions

    big = big_tokenizer(30000)
    assert big.get_vocab_size() >= 30000
    texts = captions(big, 512)
    scans = []
    real = tokenizer.continuation_ids
    monkeypatch.setattr(tokenizer, "continuation_ids", lambda t: scans.append(1) or real(t))
    ids, mask = encode(big, texts, max_len=16)
    assert scans == []  # the spec is not built by encode at all
    assert ids.shape == (512, 16) and (ids[mask == 0] == 0).all() and (ids[:, 0] == 2).all()
    text_spec(big, 16)
    assert scans == [1]  # built once, where the caller asks for it
    # per-row cost: one batch of 8 costs per row about what a batch of 256 does (no per-call scan)
    small = [texts[i:i + 8] for i in range(0, 256, 8)]
    t0 = time.perf_counter()
    for b in small:
        encode(big, b, 16)
    per_row_small = (time.perf_counter() - t0) / 256
    t0 = time.perf_counter()
    encode(big, texts[:256], 16)
    per_row_big = (time.perf_counter() - t0) / 256
    spec_s = min(_timed(lambda: text_spec(big, 16)) for _ in range(3))
    assert per_row_small < per_row_big + spec_s / 8  # the old cost was a whole scan per 8 rows


def _timed(fn) -> float:  # noqa: ANN001
    import time

    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0

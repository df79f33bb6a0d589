"""Tokenizing captions with a real-size vocabulary: per-row time of `encode`, old vs new, in one run.

Old: every `encode` call without a pad id built the full TextSpec (its continuation ids scan the
whole vocabulary). New: the pad id is looked up by name. The tokenizer is a 30k-word WordPiece
built here from a synthetic vocabulary (no download); batches of 256 captions as the pipeline
tokenizes them, the two sides alternated.

    .venv/bin/python -m benchmarks.tokenize [--vocab 30000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from tokenizers import Tokenizer

from jobs.data.tokenizer import SPECIAL_TOKENS, _bert_tokenizer, encode, text_spec


def big_tokenizer(words: int, seed: int = 0) -> Tokenizer:
    """A BERT-style WordPiece with `words` entries: whole words and ##continuations, as BERT's 30k."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    vocab |= {c: len(vocab) + i for i, c in enumerate(letters)}
    vocab |= {f"##{c}": len(vocab) + i for i, c in enumerate(letters)}
    while len(vocab) < words:
        w = "".join(rng.choice(letters) for _ in range(rng.randint(2, 9)))
        vocab.setdefault(w if rng.random() < 0.7 else f"##{w}", len(vocab))
    from tokenizers import processors

    tok = _bert_tokenizer(vocab)
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok


def captions(tok: Tokenizer, n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    words = [w for w in tok.get_vocab() if w.isalpha()]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(6, 14))) for _ in range(n)]


def per_row_us(fn, texts: list[str], batch: int) -> float:  # noqa: ANN001
    t0 = time.perf_counter()
    for i in range(0, len(texts), batch):
        fn(texts[i:i + batch])
    return 1e6 * (time.perf_counter() - t0) / len(texts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=30000)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    tok = big_tokenizer(args.vocab)
    texts = captions(tok, args.rows)
    L = 32
    sides = {"old (TextSpec per call)": lambda b: encode(tok, b, L, pad_id=text_spec(tok, L).pad_id),
             "new (pad id by name)": lambda b: encode(tok, b, L)}
    times: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(args.rounds):
        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):  # alternate the order
            times[name].append(per_row_us(sides[name], texts, args.batch))
    old, new = (statistics.median(v) for v in times.values())
    print(f"encode, {tok.get_vocab_size()}-entry vocabulary, batches of {args.batch}, {args.rows} rows x "
          f"{args.rounds} alternated rounds: old {old:.1f} us/row, new {new:.1f} us/row, old/new {old / new:.2f}")


if __name__ == "__main__":
    main()

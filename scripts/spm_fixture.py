#!/usr/bin/env python3
"""Writes tests/it/fixtures/spm-bpe.json: a small SentencePiece BPE vocabulary trained with
Llama-2's tokenizer settings (byte fallback, split digits, dummy prefix, identity normalisation)
on data/corpus/frankenstein-part.txt, and the ids SentencePiece itself gives for test texts.
The Rust test `gguf_tokenizer::sentencepiece_gguf_matches_real_sentencepiece` writes the
vocabulary into a GGUF (`tokenizer.ggml.model = "llama"`) and checks oedit's ids against them.

    pip install sentencepiece   # the fixture records the version (0.2.3 when written)
    python3 scripts/spm_fixture.py
"""
import json
import os
import tempfile

import sentencepiece as spm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "data", "corpus", "frankenstein-part.txt")
OUT = os.path.join(ROOT, "tests", "it", "fixtures", "spm-bpe.json")

TEXTS = [
    "The capital of France is Paris.",
    "Toko Yasuda, the",
    "  It was on a dreary night of November that I beheld the accomplishment of my toils.",
    "In 1818, 1234567 people read it; 3.14159 and 0.5%.",
    "Frankenstein;   or, the Modern Prometheus\n\nChapter 19\tends",
    "café naïve ñ Zürich 東京 🙂 Ⅻ",
    "I'm sure they'll say it's fine. DON'T!",
    " leading space",
    "trailing spaces   ",
    " ",
    "x",
    "",
]


def main():
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "m")
        spm.SentencePieceTrainer.train(
            input=CORPUS,
            model_prefix=prefix,
            model_type="bpe",
            vocab_size=1000,
            character_coverage=0.9995,
            byte_fallback=True,
            split_digits=True,
            add_dummy_prefix=True,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            normalization_rule_name="identity",
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=2,
            minloglevel=2,
        )
        sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    scores = [sp.get_score(i) for i in range(n)]
    # llama.cpp's token types: normal 1, unknown 2, control 3, user-defined 4, unused 5, byte 6.
    def ttype(i):
        if sp.is_unknown(i):
            return 2
        if sp.is_control(i):
            return 3
        if sp.is_byte(i):
            return 6
        if sp.is_unused(i):
            return 5
        return 1
    types = [ttype(i) for i in range(n)]
    cases = [{"text": t, "ids": sp.encode(t)} for t in TEXTS]
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump({"sentencepiece": spm.__version__, "tokens": pieces, "scores": scores, "types": types,
                   "cases": cases}, f, ensure_ascii=False)
        f.write("\n")
    print(f"{OUT}: {n} pieces, {len(cases)} texts")


if __name__ == "__main__":
    main()

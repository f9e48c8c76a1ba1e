"""Tokenizers of the demo, built from the prompts' words: a CLIP byte-level BPE and a T5 sentencepiece model.

CLIP (``tokenizer/``): ``vocab.json`` holds the 256 byte characters of the byte-level alphabet, the same 256
with the end-of-word mark ``</w>``, one entry per learned merge, then ``<|startoftext|>`` and
``<|endoftext|>`` last, so that end-of-text has the largest id (CLIP's pooled output is taken at
``argmax(input_ids)`` when the config's ``eos_token_id`` is 2, as in FLUX.1's CLIP ViT-L/14).
``merges.txt`` (header ``#version: 0.2``) lists the merges in the order they were learned: repeatedly the most
frequent adjacent pair of symbols over the prompts' words (ties broken alphabetically), until every word is a
single symbol.

T5 (``tokenizer_2/``): a sentencepiece model trained on the prompts with T5's special ids (pad 0, eos 1,
unk 2, no bos). T5's own model is a unigram model, but on eleven short sentences sentencepiece's unigram
trainer keeps little more than single characters; its BPE trainer (``hard_vocab_limit=False``) learns whole
words (``▁a ▁handwritten ▁digit ▁seven``), which keeps the T5 sequence short. The tokenizer reads either
kind of ``spiece.model``.
"""
import io
import json
from collections import Counter
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

__all__ = ["byte_alphabet", "learn_bpe_merges", "write_clip_tokenizer", "write_t5_tokenizer"]

END_OF_WORD = "</w>"
START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
CLIP_MAX_LENGTH = 77


def byte_alphabet() -> Dict[int, str]:
    """Byte value -> printable character of byte-level BPE.

    Bytes that are visible Latin-1 characters (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) map to themselves; the
    other 68 bytes (controls, space, soft hyphen...) map, in increasing byte order, to the code points 256, 257...
    """
    visible = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    table = {b: chr(b) for b in visible}
    next_code = 256
    for b in range(256):
        if b not in table:
            table[b] = chr(next_code)
            next_code += 1
    return table


def _word_symbols(word: str, alphabet: Dict[int, str]) -> Tuple[str, ...]:
    chars = [alphabet[b] for b in word.encode("utf-8")]
    return tuple(chars[:-1]) + (chars[-1] + END_OF_WORD,)


def learn_bpe_merges(sentences: Sequence[str]) -> List[Tuple[str, str]]:
    """Merges that turn every (lower-cased, whitespace-split) word of ``sentences`` into one symbol."""
    alphabet = byte_alphabet()
    words = Counter(_word_symbols(w, alphabet) for s in sentences for w in s.lower().split())
    merges: List[Tuple[str, str]] = []
    while True:
        pairs: Counter = Counter()
        for symbols, count in words.items():
            for pair in zip(symbols[:-1], symbols[1:]):
                pairs[pair] += count
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: Counter = Counter()
        for symbols, count in words.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_clip_tokenizer(folder, sentences: Sequence[str]) -> int:
    """Write ``vocab.json``, ``merges.txt``, ``tokenizer_config.json``, ``special_tokens_map.json``.

    Returns:
        the vocabulary size (the CLIP text model's ``vocab_size``).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = sorted(set(byte_alphabet().values()))
    merges = learn_bpe_merges(sentences)
    tokens = base + [c + END_OF_WORD for c in base] + [a + b for a, b in merges] + [START_TOKEN, END_TOKEN]
    vocab = {}
    for token in tokens:  # a merge product can repeat an existing symbol; keep its first id
        vocab.setdefault(token, len(vocab))
    _write_json(folder / "vocab.json", vocab)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    _write_json(folder / "special_tokens_map.json", {"bos_token": START_TOKEN, "eos_token": END_TOKEN,
                                                     "pad_token": END_TOKEN, "unk_token": END_TOKEN})
    _write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": CLIP_MAX_LENGTH, "bos_token": START_TOKEN,
        "eos_token": END_TOKEN, "pad_token": END_TOKEN, "unk_token": END_TOKEN, "errors": "replace",
        "clean_up_tokenization_spaces": False})
    return len(vocab)


def write_t5_tokenizer(folder, sentences: Sequence[str]) -> int:
    """Train and write ``spiece.model`` (plus ``tokenizer_config.json``, ``special_tokens_map.json``).

    Returns:
        the vocabulary size (the T5 encoder's ``vocab_size``).
    """
    import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    corpus = [s for s in sentences if s.strip()]
    if not corpus:
        raise ValueError("no non-empty sentence to train the T5 tokenizer on")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus * 8), model_writer=model, vocab_size=100,
                                   hard_vocab_limit=False, model_type="bpe", pad_id=0, eos_id=1, unk_id=2,
                                   bos_id=-1, minloglevel=2)
    (folder / "spiece.model").write_bytes(model.getvalue())
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    _write_json(folder / "special_tokens_map.json", {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"})
    _write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "T5Tokenizer", "model_max_length": 512, "eos_token": "</s>", "pad_token": "<pad>",
        "unk_token": "<unk>", "extra_ids": 0, "additional_special_tokens": [], "legacy": True,
        "clean_up_tokenization_spaces": False})
    return int(processor.get_piece_size())

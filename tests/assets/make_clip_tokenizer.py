"""Generate the tiny byte-level BPE CLIP tokenizer vendored in ``tests/assets/clip_tokenizer``.

The real CLIP vocabulary (49408 entries) cannot be downloaded on the test machines and would make the tiny text
encoder's embedding table dominate its size. This script learns a few hundred BPE merges from a small word list of
the prompts the tests use, on top of the full byte-level alphabet, so that:

* any text (emoji, accents, punctuation) encodes without an unknown token: every one of the 256 byte symbols is in
  the vocabulary, alone and in its end-of-word (``</w>``) form;
* the words of the word list are single tokens ("toy" in particular, the textual inversion initializer);
* the vocabulary stays under 1000 entries.

The layout follows the original CLIP files: byte symbols, then their ``</w>`` forms, then one entry per merge, then
``<|startoftext|>`` and ``<|endoftext|>``. Learning is deterministic (ties broken by the pair's text), so running
``python tests/assets/make_clip_tokenizer.py`` reproduces the committed files byte for byte.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

END_OF_WORD = "</w>"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_MERGES = 480

# Words of the prompts used by the tests and examples (DreamBooth "a photo of sks toy", the digits, styles).
# Words left out on purpose stay several tokens: "square" is 6, handy to test a multi-token initializer error.
WORDS = """
a an the of in on with and by at to for from is
photo photograph picture image drawing painting rendering sketch render portrait illustration
style art oil watercolor cartoon anime realistic detailed high quality colorful bright dark
handwritten digit number zero one two three four five six seven eight nine
sks toy cat dog man woman person bird car house tree flower sky mountain beach water city street
red green blue yellow black white small large circle triangle shape background
sitting standing table close up view forest castle robot astronaut horse riding moon space sunset
vase backpack teapot golden retriever wearing hat glasses
""".split()


def bytes_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: each byte maps to one printable unicode character (as in GPT-2 and CLIP)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    byte_values = printable[:]
    code_points = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in byte_values:
            byte_values.append(byte)
            code_points.append(256 + extra)
            extra += 1
    return {byte: chr(code_point) for byte, code_point in zip(byte_values, code_points)}


def word_to_symbols(word: str, byte_encoder: dict[int, str]) -> tuple[str, ...]:
    symbols = [byte_encoder[byte] for byte in word.encode("utf-8")]
    symbols[-1] += END_OF_WORD
    return tuple(symbols)


def learn_merges(words: list[str], byte_encoder: dict[int, str], max_merges: int) -> list[tuple[str, str]]:
    """Classic BPE learning (Sennrich et al.): repeatedly merge the most frequent adjacent pair.

    Every word counts once; ties go to the lexicographically smallest pair so the output never depends on dict or
    set ordering. Stops when every word is a single symbol or after ``max_merges`` merges.
    """
    vocabulary = collections.Counter(word_to_symbols(word, byte_encoder) for word in words)
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pair_counts: collections.Counter[tuple[str, str]] = collections.Counter()
        for symbols, count in vocabulary.items():
            for pair in zip(symbols, symbols[1:]):
                pair_counts[pair] += count
        if not pair_counts:
            break
        best_pair = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        merges.append(best_pair)
        merged_vocabulary: collections.Counter[tuple[str, ...]] = collections.Counter()
        for symbols, count in vocabulary.items():
            merged_vocabulary[merge_pair(symbols, best_pair)] += count
        vocabulary = merged_vocabulary
    unmerged = ["".join(symbols) for symbols in vocabulary if len(symbols) > 1]
    if unmerged:
        raise SystemExit(f"{len(unmerged)} words are still several tokens after {max_merges} merges: {unmerged}")
    return merges


def merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged = []
    index = 0
    while index < len(symbols):
        if index + 1 < len(symbols) and (symbols[index], symbols[index + 1]) == pair:
            merged.append(symbols[index] + symbols[index + 1])
            index += 2
        else:
            merged.append(symbols[index])
            index += 1
    return tuple(merged)


def build_vocab(merges: list[tuple[str, str]], byte_encoder: dict[int, str]) -> dict[str, int]:
    alphabet = list(byte_encoder.values())
    tokens = alphabet + [symbol + END_OF_WORD for symbol in alphabet]
    tokens += ["".join(pair) for pair in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    if len(set(tokens)) != len(tokens):
        raise SystemExit("duplicate tokens in the generated vocabulary")
    return {token: index for index, token in enumerate(tokens)}


def write_tokenizer(out_dir: Path) -> None:
    byte_encoder = bytes_to_unicode()
    unique_words = sorted(set(WORDS))
    merges = learn_merges(unique_words, byte_encoder, MAX_MERGES)
    vocab = build_vocab(merges, byte_encoder)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    merges_text = "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges)
    (out_dir / "merges.txt").write_text(merges_text, encoding="utf-8")
    # model_max_length 77 as in the real CLIP: without it transformers defaults to ~1e30 and pipelines overflow.
    tokenizer_config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out_dir}: {len(vocab)} tokens, {len(merges)} merges, {len(unique_words)} words")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=Path(__file__).resolve().parent / "clip_tokenizer",
        help="folder to write vocab.json, merges.txt and tokenizer_config.json to (default: the vendored folder)",
    )
    write_tokenizer(parser.parse_args().out_dir)


if __name__ == "__main__":
    main()

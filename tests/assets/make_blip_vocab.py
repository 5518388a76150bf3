"""Generate the tiny BERT WordPiece vocabulary vendored in ``tests/assets/blip_vocab/vocab.txt``.

BLIP's text decoder uses a BERT tokenizer whose vocabulary (30524 entries) cannot be downloaded on the test
machines. This one has the special tokens BLIP needs (``[DEC]`` starts a caption, ``[SEP]`` ends it, ``[ENC]`` is
the image-text matching start token), a few caption words, and every lowercase letter, digit and ASCII punctuation
mark both alone and as a ``##`` continuation, so WordPiece can spell any lowercase ASCII word without ``[UNK]``.

Run ``python tests/assets/make_blip_vocab.py`` to reproduce the committed file.
"""

from __future__ import annotations

import argparse
import string
from pathlib import Path

# The order fixes the ids the tiny model's config refers to: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4,
# [DEC]=5, [ENC]=6.
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]

CAPTION_WORDS = """
a an the of in on with and at is are there two three
photograph photo picture drawing painting image
cat dog man woman person toy car house tree flower sky
red green blue yellow black white small large circle square triangle shape background
sitting standing next to on top close up
""".split()


def vocabulary_tokens() -> list[str]:
    characters = list(string.ascii_lowercase) + list(string.digits) + list(string.punctuation)
    tokens = SPECIAL_TOKENS + characters + [f"##{character}" for character in characters]
    seen = set(tokens)
    for word in CAPTION_WORDS:
        if word not in seen:
            tokens.append(word)
            seen.add(word)
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out-file",
        type=Path,
        default=Path(__file__).resolve().parent / "blip_vocab" / "vocab.txt",
        help="where to write the vocabulary, one token per line (default: the vendored file)",
    )
    out_file = parser.parse_args().out_file
    tokens = vocabulary_tokens()
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text("".join(f"{token}\n" for token in tokens), encoding="utf-8")
    print(f"wrote {out_file}: {len(tokens)} tokens")


if __name__ == "__main__":
    main()

"""Word vocabulary for cleaned captions: ids, encoding, decoding, JSON files.

Keras 3 dropped ``keras.preprocessing.text.Tokenizer``. ``keras.layers.TextVectorization`` is
not used instead because it runs as a TensorFlow-graph layer whose behaviour depends on the
backend, reserves ids its own way (``""`` then ``"[UNK]"``, no start/end tokens), and is a poor
fit for the beam-search loop, which needs plain-Python ``encode``/``decode`` per step. This
class is pure Python plus NumPy, and saves to JSON.

Ids: ``<pad>`` 0, ``<unk>`` 1, ``<start>`` 2, ``<end>`` 3, then the training words by
descending count, ties alphabetical.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from captioner.errors import CaptionerError

PAD, UNK, START, END = 0, 1, 2, 3
RESERVED = ("<pad>", "<unk>", "<start>", "<end>")
FORMAT = "captioner.tokenizer"
VERSION = 1
MAX_LENGTH = 10_000  # tokens per caption: bounds what a file's number can make us allocate


class Tokenizer:
    """Maps cleaned captions (space-separated words) to int ids and back."""

    def __init__(
        self,
        words: Sequence[str],
        counts: Sequence[int],
        max_length: int,
        min_count: int = 1,
    ) -> None:
        """``words``/``counts``: non-reserved words in id order (ids from 4) and their training
        counts. ``max_length``: tokens per encoded caption, ``<start>`` and ``<end>`` included."""
        if len(words) != len(counts):
            raise ValueError("words and counts differ in length")
        if not 2 <= max_length <= MAX_LENGTH:
            raise ValueError(f"max_length must be between 2 (<start> and <end>) and {MAX_LENGTH}")
        if not all(isinstance(w, str) and w and not any(c.isspace() for c in w) for w in words):
            raise ValueError("every word must be a non-empty string without spaces")
        self.words: list[str] = list(RESERVED) + list(words)
        self.counts: list[int] = [0] * len(RESERVED) + [int(c) for c in counts]
        self.index: dict[str, int] = {w: i for i, w in enumerate(self.words)}
        if len(self.index) != len(self.words):
            raise ValueError("duplicate word in the vocabulary")
        self.max_length = int(max_length)
        self.min_count = int(min_count)

    @classmethod
    def build(
        cls, captions: Iterable[str], min_count: int = 1, max_length: int | None = None
    ) -> Tokenizer:
        """Vocabulary of the words seen at least ``min_count`` times in (cleaned, TRAINING)
        ``captions``. ``max_length`` defaults to the longest caption in words + 2, and is
        capped at the argument when one is given."""
        counter: Counter[str] = Counter()
        longest = 0
        for caption in captions:
            tokens = caption.split()
            counter.update(tokens)
            longest = max(longest, len(tokens))
        ranked = sorted(
            ((w, c) for w, c in counter.items() if c >= min_count and w not in RESERVED),
            key=lambda wc: (-wc[1], wc[0]),
        )
        length = longest + 2 if max_length is None else min(longest + 2, max_length)
        return cls([w for w, _ in ranked], [c for _, c in ranked], length, min_count)

    @property
    def vocab_size(self) -> int:
        """Number of ids, the 4 reserved ones included (the embedding/softmax size)."""
        return len(self.words)

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """``[<start>] + word ids + [<end>]`` (unknown words -> ``<unk>``), cut to
        ``max_length`` keeping ``<end>``. Without ``add_special`` only the word ids, cut to the
        same ``max_length - 2`` words."""
        ids = [self.index.get(w, UNK) for w in text.split()][: self.max_length - 2]
        return [START, *ids, END] if add_special else ids

    def decode(self, ids: Iterable[int]) -> str:
        """Words of ``ids``: skips ``<pad>``/``<start>``, stops at ``<end>``, keeps ``<unk>``."""
        words = []
        for raw in ids:
            i = int(raw)
            if i == END:
                break
            if i in (PAD, START):
                continue
            if not 0 <= i < len(self.words):
                raise ValueError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
            words.append(self.words[i])
        return " ".join(words)

    def encode_batch(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), max_length)`` int32 array of :meth:`encode` results, 0-padded after."""
        out = np.zeros((len(texts), self.max_length), dtype=np.int32)
        for row, text in enumerate(texts):
            ids = self.encode(text)
            out[row, : len(ids)] = ids
        return out

    def to_json(self) -> dict[str, object]:
        """JSON-ready dict: format, version, min_count, max_length, words (id order), counts."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "min_count": self.min_count,
            "max_length": self.max_length,
            "words": self.words,
            "counts": self.counts,
        }

    @classmethod
    def from_json(cls, data: object, source: str = "tokenizer JSON") -> Tokenizer:
        """Inverse of :meth:`to_json`; CaptionerError (naming ``source``) when malformed."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CaptionerError(f"{source}: not a captioner tokenizer file")
        if data.get("version") != VERSION:
            raise CaptionerError(
                f"{source}: tokenizer format version {data.get('version')!r} is not supported "
                f"(this captioner reads version {VERSION}); rebuild the vocabulary"
            )
        words, counts = data.get("words"), data.get("counts")
        if not isinstance(words, list) or not isinstance(counts, list):
            raise CaptionerError(f"{source}: 'words' and 'counts' must be lists")
        if tuple(words[: len(RESERVED)]) != RESERVED:
            raise CaptionerError(f"{source}: the first words must be {', '.join(RESERVED)}")
        try:
            return cls(
                words[len(RESERVED) :],
                counts[len(RESERVED) :],
                int(data["max_length"]),
                int(data.get("min_count", 1)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CaptionerError(f"{source}: invalid tokenizer ({exc})") from None

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_json` to ``path`` as UTF-8 JSON (atomically)."""
        from captioner.storage.files import write_text

        text = json.dumps(self.to_json(), ensure_ascii=False)
        try:
            write_text(path, text + "\n")
        except OSError as exc:
            raise CaptionerError(f"{path}: cannot write tokenizer file ({exc.strerror})") from None

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Read a file written by :meth:`save`; errors name the file."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CaptionerError(f"{path}: tokenizer file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise CaptionerError(f"{path}: cannot read tokenizer file ({exc})") from None
        except json.JSONDecodeError as exc:
            raise CaptionerError(
                f"{path}:{exc.lineno}: invalid JSON ({exc.msg}); rebuild the vocabulary"
            ) from None
        return cls.from_json(data, source=str(path))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self.to_json() == other.to_json()

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, max_length={self.max_length}, "
            f"min_count={self.min_count})"
        )

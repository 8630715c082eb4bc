"""Grounding: a caption names an object (dog, cat, bus, ...) only when the encoder sees one.

Flickr8k is one third dogs, and a decoder trained on it learns that prior: it names dogs in
photos of skunks and cats. The encoder knows better — its ImageNet classifier head (global
average pooling and one dense layer over the very feature map the decoder attends to) tells a
tabby from a beagle. At decode time every word of an object family (``object_families.json``:
family -> ImageNet classes and caption words) gets the bonus ``strength * log(max(mass, floor))``
added to its log-probability at every step, where ``mass`` is the probability the head gives the
family's classes for that image (summed over the families that list the word). A word the head
supports (mass near 1) keeps its score; a dog the head does not see loses up to
``strength * log(floor)``.

Pure numpy: the Keras and the ONNX runtime share it. A run folder carries the head as
``imagenet_head.npz`` (kernel and bias, read with ``allow_pickle=False``) and the family map as
``object_families.json``; its ``config.json`` names them under ``"grounding"``. The strength is a
decoding setting (:attr:`captioner.formats.decoding_config.DecodingConfig.grounding`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from captioner.errors import CaptionerError

HEAD_FILE = "imagenet_head.npz"
FAMILIES_FILE = "object_families.json"
FAMILIES_FORMAT = "captioner.object_families"
BUNDLED_FAMILIES = Path(str(resources.files("captioner") / "resources" / FAMILIES_FILE))
NUM_CLASSES = 1000
FLOOR = 1e-4  # the smallest mass: a word's largest penalty is strength * log(FLOOR)


def channel_means(features: np.ndarray) -> np.ndarray:
    """(B, C) float32 channel means of feature maps (B, H, W, C) or (B, L, C), or (B, C) as given:
    the global average pool both the ImageNet head and the neighbour index read."""
    x = np.asarray(features, np.float32)
    return x.reshape(len(x), -1, x.shape[-1]).mean(axis=1)


class GroundingError(CaptionerError):
    """A grounding file (the head or the family map) is missing or malformed."""


@dataclass(frozen=True)
class ObjectFamilies:
    """Object families: ``names[i]`` is tied to the ImageNet ``classes[i]`` and named in
    captions by ``words[i]``."""

    names: tuple[str, ...]
    classes: tuple[tuple[int, ...], ...]
    words: tuple[tuple[str, ...], ...]

    @classmethod
    def load(cls, path: str | os.PathLike = BUNDLED_FAMILIES) -> ObjectFamilies:
        """Read and check a family map; a bad file is one :class:`GroundingError` line."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise GroundingError(f"{path}: cannot read the object family map ({exc})") from exc
        if not isinstance(data, dict) or data.get("format") != FAMILIES_FORMAT:
            raise GroundingError(f"{path}: not a {FAMILIES_FORMAT} file")
        families = data.get("families")
        if not isinstance(families, dict) or not families:
            raise GroundingError(f"{path}: 'families' must be a non-empty object")
        return cls(*zip(*(_family(path, name, f) for name, f in families.items()), strict=True))

    def class_matrix(self) -> np.ndarray:
        """(1000, F) 0/1: which family each ImageNet class belongs to."""
        matrix = np.zeros((NUM_CLASSES, len(self.names)), np.float32)
        for j, classes in enumerate(self.classes):
            matrix[list(classes), j] = 1.0
        return matrix

    def word_matrix(self, vocabulary: Sequence[str]) -> np.ndarray:
        """(F, V) 0/1: which family words are in ``vocabulary`` (words absent are skipped)."""
        index = {w: i for i, w in enumerate(vocabulary)}
        matrix = np.zeros((len(self.names), len(vocabulary)), np.float32)
        for j, words in enumerate(self.words):
            matrix[j, [index[w] for w in words if w in index]] = 1.0
        return matrix


def _family(path: Any, name: str, family: Any) -> tuple[str, tuple[int, ...], tuple[str, ...]]:
    """(name, classes, words) of one family entry, checked."""
    where = f"{path}: family '{name}'"
    if not isinstance(family, dict):
        raise GroundingError(f"{where} must be an object")
    words, classes = family.get("words"), family.get("classes")
    if not isinstance(words, list) or not words or not all(
            isinstance(w, str) and w and w == w.strip().lower() and " " not in w for w in words):
        raise GroundingError(f"{where}: 'words' must be a non-empty list of lowercase words")
    if not isinstance(classes, dict) or not classes:
        raise GroundingError(f"{where}: 'classes' must map class indices to class names")
    try:
        ids = tuple(sorted(int(k) for k in classes))
    except ValueError as exc:
        raise GroundingError(f"{where}: class keys must be integers ({exc})") from exc
    if ids[0] < 0 or ids[-1] >= NUM_CLASSES:
        raise GroundingError(f"{where}: class indices must be in 0..{NUM_CLASSES - 1}")
    return name, ids, tuple(words)


class Grounding:
    """The ImageNet head over a feature map and the word bonuses it implies.

    ``kernel`` (C, 1000) and ``bias`` (1000,) are the head's dense layer over the channel means
    of the feature map (C channels); ``vocabulary`` the tokenizer's words in id order.
    """

    def __init__(self, kernel: np.ndarray, bias: np.ndarray, families: ObjectFamilies,
                 vocabulary: Sequence[str]):
        self.kernel = np.asarray(kernel, np.float32)
        self.bias = np.asarray(bias, np.float32)
        self.families = families
        words = families.word_matrix(vocabulary)  # (F, V)
        self._class_words = families.class_matrix() @ words  # (1000, V): classes backing a word
        self._gated = words.sum(axis=0) > 0  # (V,) words that name a family

    @property
    def gated_words(self) -> np.ndarray:
        """Ids of the vocabulary words that name an object family."""
        return np.flatnonzero(self._gated)

    def class_probs(self, features: np.ndarray) -> np.ndarray:
        """(B, 1000) ImageNet class probabilities of feature maps (B, H, W, C) or pooled (B, C)."""
        pooled = channel_means(features)  # (B, C) global average pool
        if pooled.shape[1] != self.kernel.shape[0]:
            raise GroundingError(f"the ImageNet head takes {self.kernel.shape[0]} channels, "
                                 f"the features have {pooled.shape[1]}")
        logits = pooled @ self.kernel + self.bias  # (B, 1000)
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        return probs / probs.sum(axis=1, keepdims=True)

    def word_bonus(self, features: np.ndarray, strength: float, boost: float = 0.0) -> np.ndarray:
        """(B, V) log-prob bonus per word: ``strength * log(max(mass, FLOOR))`` for family
        words, plus ``boost * (2 * mass - 1)`` where the head is sure (mass > 0.5), 0 for every
        other word."""
        mass = np.minimum(self.class_probs(features) @ self._class_words, 1.0)  # (B, V)
        bonus = strength * np.log(np.maximum(mass, FLOOR)) + boost * np.maximum(2 * mass - 1, 0)
        return np.where(self._gated, bonus, 0.0).astype(np.float32)

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, settings: Any,
                 vocabulary: Sequence[str]) -> Grounding | None:
        """The grounding a run folder carries (``settings``: its config's ``"grounding"``
        object), or None when it carries none (e.g. only a neighbour index)."""
        if not settings:
            return None
        run = Path(run_dir)
        if not isinstance(settings, dict):
            raise GroundingError(f"{run / 'config.json'}: grounding: must be an object")
        if "head" not in settings:
            return None
        head = run / str(settings.get("head", HEAD_FILE))
        kernel, bias = read_head(head)
        families = ObjectFamilies.load(run / str(settings.get("families", FAMILIES_FILE)))
        return cls(kernel, bias, families, vocabulary)


def read_head(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(kernel (C, 1000), bias (1000,)) of a head file, checked (no pickle is ever loaded)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            kernel, bias = data["kernel"], data["bias"]
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise GroundingError(f"{path}: cannot read the ImageNet head ({exc}); copy it again "
                             "from the model's source or remove 'grounding' from config.json"
                             ) from exc
    if (kernel.ndim != 2 or kernel.shape[1] != NUM_CLASSES or bias.shape != (NUM_CLASSES,)
            or kernel.dtype.kind != "f" or bias.dtype.kind != "f"
            or not (np.isfinite(kernel).all() and np.isfinite(bias).all())):
        raise GroundingError(f"{path}: the ImageNet head must hold a finite float kernel "
                             f"(C, {NUM_CLASSES}) and bias ({NUM_CLASSES},)")
    return kernel, bias


def write_head(path: str | os.PathLike, kernel: np.ndarray, bias: np.ndarray) -> None:
    """Store a head as ``.npz`` (kernel as float16: the probabilities change by < 1e-3)."""
    np.savez(path, kernel=np.asarray(kernel, np.float16), bias=np.asarray(bias, np.float32))


def attach(run_dir: str | os.PathLike, config: Any = None,
           weights: str | os.PathLike | None = None) -> bool:
    """Give a run folder grounding: its encoder's ImageNet head (``weights``: the encoder's
    weights file, default its official one) and the bundled family map, written into the folder
    and listed in its ``config.json``. False (nothing written) when the encoder has no head
    over the features the decoder reads (only EfficientNet-Lite ``conv``/``pool`` have one).
    ``config``: the folder's RunConfig when the caller holds it (else read from the folder)."""
    from captioner.formats.run_folder import RunConfig
    from captioner.storage.files import sha256sum

    run = Path(run_dir)
    config = config if config is not None else RunConfig.load(run)
    enc = config.encoder
    if not (enc.name.startswith("efficientnet_lite") and enc.layer in ("conv", "pool")
            and (weights or enc.weights == "imagenet")):
        return False
    from captioner.encoders.efficientnet import imagenet_head

    write_head(run / HEAD_FILE, *imagenet_head(enc.name, weights or "imagenet"))
    (run / FAMILIES_FILE).write_bytes(BUNDLED_FAMILIES.read_bytes())
    config.grounding = {"head": HEAD_FILE, "families": FAMILIES_FILE}
    if config.files:  # a folder whose files are listed lists these too
        for name in (HEAD_FILE, FAMILIES_FILE):
            config.files[name] = {"size": (run / name).stat().st_size,
                                  "sha256": sha256sum(run / name)}
    config.save(run)
    return True


def grounded(state: Any, step: Callable, bonus: np.ndarray) -> tuple[Any, Callable]:
    """A search's (state, step) with ``bonus`` (rows, V) added to every step's log-probs; the
    bonus rides in the state, so beam search repeats and reorders it with its rows."""

    def step_with_bonus(tokens: np.ndarray, carried: tuple) -> tuple[np.ndarray, tuple]:
        inner, rows_bonus = carried
        log_probs, new = step(tokens, inner)
        return log_probs + rows_bonus, (new, rows_bonus)

    return (state, bonus), step_with_bonus

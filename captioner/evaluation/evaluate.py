"""Stage 5: caption every image of a split with a run folder and score the captions.

Features come from a cache (whose encoder and layer must match the run's) or from the run's own
encoder applied to image files. References are the split's captions cleaned with the run's own
rules, so the scored strings are exactly those the model was trained on. Each decoding setting
(greedy, beam 3, ...) gives one :class:`Section`; features are read once and every setting
captions each batch in turn.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captioner.errors import CacheMismatchError, CaptionerError, IncompleteError, OptionError
from captioner.evaluation.meteor import MeteorJar, meteor
from captioner.evaluation.metrics import METRIC_KEYS, References
from captioner.formats.decoding_config import DecodingConfig
from captioner.formats.run_folder import RunConfig

if TYPE_CHECKING:  # numpy and the search are imported where used: the CLI reads defaults here
    import numpy as np

    from captioner.inference.decoding import Caption

DEFAULT_BATCH_SIZE = 128
ENCODER_BATCH = 16  # images per encoder call in images mode (VGG activations are large)
ATTENTION_IMAGES = 24
NO_REFERENCES = "no reference captions"


Decoding = DecodingConfig  # one decoding setting (the name the report and older code use)


@dataclass
class AttentionMap:
    """Per-word attention of one generated caption: ``weights`` is (len(words), h, w)."""

    words: list[str]
    weights: np.ndarray


@dataclass
class Section:
    """One decoding setting's captions, scores and timings."""

    decoding: Decoding
    captions: dict[str, Caption] = field(default_factory=dict)
    scores: dict[str, Any] = field(default_factory=dict)  # metrics.evaluate_all output
    pycoco_bleu: dict[str, float] | None = None
    caption_seconds: float = 0.0
    score_seconds: float = 0.0

    @property
    def metrics(self) -> dict[str, float | None]:
        return {k: self.scores.get(k) for k in METRIC_KEYS}


@dataclass
class EvaluationResult:
    """Everything a report needs: sources, cleaned references, sections, extras for the HTML."""

    run_dir: Path
    run_config: RunConfig
    sources: dict[str, str | None]
    references: dict[str, list[str]]  # image -> cleaned references, evaluation order
    sections: list[Section]
    skipped: dict[str, str] = field(default_factory=dict)  # image -> why it was not evaluated
    image_paths: dict[str, Path] = field(default_factory=dict)
    attention: dict[str, AttentionMap] = field(default_factory=dict)
    features_seconds: float = 0.0
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    failed: dict[str, str] = field(default_factory=dict)  # image -> why captioning it failed


# --------------------------------------------------------------------------- images to score


def open_matching_cache(path: str | os.PathLike, run_dir: Path, config: RunConfig):
    """Open ``path`` for reading, refusing a cache made by another encoder than the run's."""
    from captioner.features.cache import open_features

    expect = config.encoder.cache_expectation()
    try:
        return open_features(path, expect)
    except CacheMismatchError:
        with open_features(path) as reader:
            found = {k: reader.attrs.get(k) for k in expect}
    enc = config.encoder

    def describe(values: dict[str, Any]) -> str:
        return ", ".join(f"{k} {v!r}" for k, v in values.items())

    raise CaptionerError(
        f"{path} holds features of {describe(found)}, but run "
        f"{run_dir} was trained on features of {describe(expect)}. Extract the split with "
        f"`captioner extract --encoder {enc.name} --layer {enc.layer}` (and the "
        "run's encoder weights), or evaluate the run that was trained on this cache."
    )


def select_images(
    names: Sequence[str], captions: dict[str, list[str]], available, limit: int | None
) -> tuple[list[str], dict[str, str]]:
    """The names to evaluate (order kept, at most ``limit``) and why the others are skipped.

    ``available(name)`` returns None when the image can be evaluated, else the reason.
    """
    chosen: list[str] = []
    skipped: dict[str, str] = {}
    for name in dict.fromkeys(names):
        if limit is not None and len(chosen) >= limit:
            break
        reason = NO_REFERENCES if name not in captions else available(name)
        if reason:
            skipped[name] = reason
        else:
            chosen.append(name)
    return chosen, skipped


def _cache_chunks(
    reader, names: list[str], batch_size: int
) -> Iterator[tuple[list[str], np.ndarray, dict[str, str]]]:
    """Verified features in chunks; damaged rows come back as ``{name: reason}``."""
    import numpy as np

    for start in range(0, len(names), batch_size):
        good, feats, damaged = reader.read_valid(names[start : start + batch_size])
        yield good, np.asarray(feats, dtype="float32"), damaged


def _image_chunks(
    captioner, paths: dict[str, Path], batch_size: int, skipped: dict[str, str]
) -> Iterator[tuple[list[str], np.ndarray, dict[str, str]]]:
    """Encoded images in chunks of up to ``batch_size``; unreadable ones go to ``skipped``."""
    import numpy as np

    names = list(paths)
    for start in range(0, len(names), batch_size):
        items = [(name, paths[name]) for name in names[start : start + batch_size]]
        good, feats = [], []
        for keys, encoded, failed in captioner.encode_paths(items, ENCODER_BATCH):
            skipped.update({k: f"unreadable image ({reason})" for k, reason in failed.items()})
            if keys:
                good += keys
                feats.append(encoded)
        if good:
            yield good, np.concatenate(feats).astype("float32"), {}


# --------------------------------------------------------------------------- captioning


def _caption_chunk(captioner, feats: np.ndarray, decoding: Decoding) -> list[Caption | str]:
    """The caption of each row, or the reason it has none (non-finite features or outputs)."""
    found = captioner.caption(feats, decoding, batch_size=len(feats))
    return [r.error if r.error else r.captions[0] for r in found]


def attention_maps(
    captioner, feats: np.ndarray, captions: Sequence[Caption]
) -> list[AttentionMap]:
    """Attention weights of each generated caption, teacher-forced through the decoder."""
    alphas = captioner.attention(feats, [c.tokens for c in captions])  # each (T + 1, h, w)
    words = captioner.tokenizer.words
    return [
        AttentionMap([words[t] for t in cap.tokens], a[: len(cap.tokens)])
        for cap, a in zip(captions, alphas, strict=True)
    ]


def score_section(section: Section, references: References, jar: MeteorJar | None = None) -> None:
    """Fill ``section``'s scores (every metric, pycocoevalcap's BLEU) and scoring time; METEOR
    1.5 through ``jar`` (a :class:`~captioner.evaluation.meteor.MeteorJar`; None: one for this call)."""
    from captioner.evaluation.metrics import evaluate_all, pycocoevalcap_bleu

    start = time.perf_counter()
    hyps = {name: section.captions[name].text for name in references}
    section.scores = evaluate_all(references, hyps)
    (meteor if jar is None else jar.score)(references, hyps).add_to(section.scores)
    section.pycoco_bleu = pycocoevalcap_bleu(references, hyps)
    section.score_seconds = time.perf_counter() - start


def _check_options(decodings: Sequence[Decoding] | None, batch_size: int,
                   limit: int | None) -> None:
    if decodings is not None and not decodings:
        raise CaptionerError("give at least one decoding setting (or None: the run's own)")
    if batch_size < 1:
        raise OptionError("batch_size", f"must be at least 1, not {batch_size}")
    if limit is not None and limit < 1:
        raise OptionError("limit", f"must be at least 1, not {limit}")


def evaluate(
    run_dir: str | os.PathLike,
    captions_path: str | os.PathLike,
    *,
    features: str | os.PathLike | None = None,
    images_dir: str | os.PathLike | None = None,
    split: str | os.PathLike | None = None,
    decodings: Sequence[Decoding | dict[str, Any]] | None = None,
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    weights: str = "best",
    attention_images: int = ATTENTION_IMAGES,
    progress: bool | None = None,
    ensemble: Sequence[str | os.PathLike] = (),
    strict: bool = False,
    max_memory: int | None = None,
) -> EvaluationResult:
    """Caption the split with every setting in ``decodings`` and score each against all references.

    With ``features`` the images are the cache's (or ``split``'s, when given); ``images_dir``
    then only supplies pictures for the report. Without ``features``, ``images_dir`` and
    ``split`` are required and the run's encoder computes the features. ``ensemble``: more run
    folders decoded together with ``run_dir`` (their log-probabilities averaged per step).
    Images whose features are damaged or whose captioning fails are left out and listed in
    ``failed``; ``strict`` makes any such failure (or an unreadable image) an error.
    ``decodings``: settings, or dicts of fields that override the run's stored decoding
    (``"decoding"`` in its config.json; None: that decoding alone). ``max_memory``: bytes a
    batch's images may take (:mod:`captioner.inference.memory`; None: the default budget).
    """
    from captioner.inference.loader import load_captioner
    from captioner.text.captions import load_captions
    from captioner.text.cleaning import CleaningRules, clean_captions

    _check_options(decodings, batch_size, limit)
    if features is None and (images_dir is None or split is None):
        raise CaptionerError(
            "give the test features (a feature cache), or an images folder together with a "
            "split file"
        )
    if images_dir is not None and not Path(images_dir).is_dir():
        raise OptionError("images_dir", f"{images_dir} is not a folder")
    run_dir = Path(run_dir)
    captioner = load_captioner([run_dir, *ensemble], weights)  # reads each config once
    captioner.max_memory = max_memory  # None: the default budget (captioner.inference.memory)
    config = captioner.config
    decodings = [d if isinstance(d, DecodingConfig) else captioner.decoding_for(**d)
                 for d in (decodings if decodings is not None else [{}])]
    rules = CleaningRules.from_dict(config.cleaning)
    captions = load_captions(captions_path)
    folder = Path(images_dir) if images_dir is not None else None
    reader = open_matching_cache(features, run_dir, config) if features is not None else None
    try:
        chosen, skipped = _choose(reader, folder, split, captions, limit)
        paths = {n: folder / n for n in chosen} if folder is not None else {}
        if reader is not None:
            chunks = _cache_chunks(reader, chosen, batch_size)
        else:
            chunks = _image_chunks(captioner, paths, batch_size, skipped)
        sections = [Section(d) for d in decodings]
        keep = attention_images if config.decoder.kind == "attention" else 0
        seconds, kept, failed = _run_chunks(captioner, chunks, sections, len(chosen), progress, keep)
    finally:
        if reader is not None:
            reader.close()
    _check_failures(failed, skipped, strict, features if features is not None else folder)
    done = [n for n in chosen if n in sections[0].captions]
    if not done:
        why = next(iter({**skipped, **failed}.values()))
        raise CaptionerError(f"no image could be captioned from {features or folder}: {why}")
    references = clean_captions({n: captions[n] for n in done}, rules)
    with MeteorJar() as jar:  # one java process for every section
        for section in sections:
            score_section(section, references, jar)
    sources = {
        "captions": str(captions_path),
        "features": _str(features),
        "images_dir": _str(images_dir),
        "split": _str(split),
        "weights": weights,
        "ensemble": [str(r) for r in ensemble],
    }
    return EvaluationResult(
        run_dir,
        config,
        sources,
        references,
        sections,
        skipped,
        failed=failed,
        image_paths={n: p for n, p in paths.items() if n in references},
        attention=_attention(captioner, kept, sections[0]),
        features_seconds=seconds,
    )


def _check_failures(failed: dict[str, str], skipped: dict[str, str], strict: bool, source) -> None:
    """With ``strict``, any failed or unreadable image is a :class:`CaptionerError`."""
    bad = {**failed, **{n: r for n, r in skipped.items() if r != NO_REFERENCES}}
    if strict and bad:
        shown = "; ".join(f"{n}: {r}" for n, r in list(bad.items())[:3])
        raise IncompleteError(f"stops here: {len(bad)} image(s) of {source} could not be "
                              f"evaluated ({shown}); rerun `captioner extract` to repair them")


def _attention(captioner, kept: dict[str, np.ndarray], section: Section) -> dict[str, AttentionMap]:
    """Attention maps of ``section``'s captions for the images whose features were kept."""
    import numpy as np

    if not kept:
        return {}
    feats = np.stack(list(kept.values()))
    maps = attention_maps(captioner, feats, [section.captions[n] for n in kept])
    return dict(zip(kept, maps, strict=True))


def _choose(
    reader, folder: Path | None, split, captions: dict[str, list[str]], limit: int | None
) -> tuple[list[str], dict[str, str]]:
    """Images to evaluate (split order, or cache order without a split) and the skipped ones."""
    from captioner.text.captions import load_split

    names = load_split(split) if split is not None else reader.names
    failed = reader.failed if reader is not None else {}

    def available(name: str) -> str | None:
        if reader is None:
            return None if (folder / name).is_file() else f"image file missing in {folder}"
        status = reader.status_of(name)
        if status == "failed":
            return f"features failed in {reader.path}: {failed.get(name, '')}"
        return None if status == "done" else f"features {status} in {reader.path}"

    chosen, skipped = select_images(names, captions, available, limit)
    if not chosen:
        shown = "; ".join(f"{n}: {r}" for n, r in list(skipped.items())[:3])
        raise CaptionerError(
            f"no image of the split can be evaluated ({shown or 'the split is empty'})"
        )
    return chosen, skipped


def _run_chunks(
    captioner,
    chunks: Iterator[tuple[list[str], np.ndarray, dict[str, str]]],
    sections: list[Section],
    total: int,
    progress: bool | None,
    keep: int,
) -> tuple[float, dict[str, np.ndarray], dict[str, str]]:
    """Caption every chunk with every setting. Returns the seconds spent getting features,
    the features of the first ``keep`` images (for attention maps) and the images that failed
    (damaged features, non-finite decoder outputs): those are in no section."""
    from captioner.progress import progress as bar

    features_seconds, kept, failed = 0.0, {}, {}
    with bar(total=total, desc="evaluating", unit="img", enabled=progress) as pbar:
        while True:
            start = time.perf_counter()
            item = next(chunks, None)
            features_seconds += time.perf_counter() - start
            if item is None:
                return features_seconds, kept, failed
            names, feats, damaged = item
            failed.update(damaged)
            for section in sections:
                start = time.perf_counter()
                generated = _caption_chunk(captioner, feats, section.decoding)
                for name, caption in zip(names, generated, strict=True):  # str: why it failed
                    (failed if isinstance(caption, str) else section.captions)[name] = caption
                section.caption_seconds += time.perf_counter() - start
            for section in sections:  # an image failing under one setting is in none
                section.captions = {n: c for n, c in section.captions.items() if n not in failed}
            good = [(n, row) for n, row in zip(names, feats, strict=True) if n not in failed]
            kept |= dict(good[: max(0, keep - len(kept))])
            pbar.update(len(names) + len(damaged))


def _str(value: str | os.PathLike | None) -> str | None:
    return None if value is None else str(value)

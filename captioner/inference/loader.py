"""The one loader of a captioning model: a run folder, a folder listing ensemble ``members`` or
several folders as one ensemble, on the runtime the folder allows — ONNX Runtime when it
carries a ``captioner export`` (:mod:`captioner.inference.onnx_runtime`), Keras otherwise
(:mod:`captioner.inference.captioner`). Every entry point (CLI, Python API, service, Ray engine,
evaluation) opens its model here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from captioner.formats.run_folder import DEFAULT_RUN
from captioner.inference.captioner import Captioner, EnsembleCaptioner
from captioner.inference.onnx_runtime import choose_runtime, load_exported


def load_captioner(
    models: str | os.PathLike | Sequence[str | os.PathLike] | None = None, weights: str = "best",
    runtime: str | None = None,
) -> Captioner:
    """The one loader: a run folder (default: the bundled model), a folder listing ``members``
    or several folders over the same encoder, decoded as one ensemble (the members of folder
    ensembles flattened). The decoding is the first folder's. ``runtime``: ``"onnx"`` (the
    folder's ``captioner export``, on ONNX Runtime), ``"keras"``, or None: ONNX when one folder
    carries an export (:func:`captioner.inference.onnx_runtime.choose_runtime`)."""
    if models is None or isinstance(models, (str, os.PathLike)):
        models = [models or DEFAULT_RUN]
    if not models:
        models = [DEFAULT_RUN]
    if choose_runtime(models, weights, runtime) == "onnx":
        return load_exported(models[0])
    loaded = [Captioner.from_run(m, weights) for m in models]
    if len(loaded) == 1:
        return loaded[0]
    members, names = [], []
    for folder, captioner in zip(models, loaded, strict=True):
        parts = getattr(captioner, "members", [captioner])
        members += parts
        names += [folder] if len(parts) == 1 else [f"{folder} ({i + 1})" for i in range(len(parts))]
    ensemble = EnsembleCaptioner(members, names)
    ensemble.folders = [Path(m) for m in models]
    return ensemble

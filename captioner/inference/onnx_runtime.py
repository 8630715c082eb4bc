"""Captions from an exported model (``captioner export``) on ONNX Runtime: numpy, Pillow and
onnxruntime only; TensorFlow, Keras, JAX and torch are never imported on this path.

:class:`OnnxCaptioner` is a :class:`~captioner.inference.captioner.Captioner` whose encoder, initial state
and per-token step are ONNX Runtime sessions; the search is the same numpy search
(:mod:`captioner.inference.decoding`) with the same masking, beams and n-best lists, and an ensemble's
members are averaged per step exactly as :func:`captioner.inference.captioner.mean_step` does. Every file
of the export is sha256-checked against ``manifest.json`` on load, and the manifest against the
run folder it sits in; a damaged or mismatched file is one :class:`ExportError` line.
:func:`choose_runtime` is how :func:`captioner.inference.loader.load_captioner` picks the runtime.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from captioner.errors import CaptionerError
from captioner.formats.decoding_config import DecodingConfig
from captioner.inference.captioner import Captioner, grid_of
from captioner.inference.consensus import Neighbours
from captioner.inference.grounding import Grounding
from captioner.inference.per_image import indexed_state, indexed_step, numpy_take
from captioner.storage.files import sha256sum
from captioner.text.tokenizer import START, Tokenizer

EXPORT_DIR = "onnx"  # a run folder's export: RUN/onnx/
EXPORT_FORMAT = "captioner.onnx"
MANIFEST_FILE = "manifest.json"
ENCODER_FILE, INIT_FILE, STEP_FILE = "encoder.onnx", "init.onnx", "step.onnx"
TOKENIZER_FILE, DECODING_FILE = "tokenizer.json", "decoding.json"
RUNTIMES = ("keras", "onnx")
SHARED_STATE = ("features",)  # one copy for every member
STATIC_STATE = ("features", "keys")  # never changed by a step: kept once per image


class ExportError(CaptionerError):
    """An export folder that is damaged, incomplete or made from another model."""


def state_names(keys: Sequence[str], members: int) -> list[str]:
    """Names of the state tensors: shared ones once, then ``m{i}_{key}`` per member."""
    shared = [k for k in keys if k in SHARED_STATE]
    return shared + [f"m{i}_{k}" for i in range(members) for k in keys if k not in SHARED_STATE]


def export_dir(folder: str | os.PathLike) -> Path | None:
    """The export a folder carries: the folder itself when it is one, else ``folder/onnx``."""
    folder = Path(folder)
    for candidate in (folder, folder / EXPORT_DIR):
        if (candidate / MANIFEST_FILE).is_file():
            return candidate
    return None


def choose_runtime(
    models: Sequence[str | os.PathLike], weights: str = "best", runtime: str | None = None
) -> str:
    """``"onnx"`` or ``"keras"``: ``runtime`` when given (``"onnx"`` needs one folder carrying an
    export, and onnxruntime), else ONNX exactly when one folder with an export is loaded with its
    best weights and onnxruntime is installed."""
    if runtime not in (None, "auto", *RUNTIMES):
        raise CaptionerError(f"unknown runtime '{runtime}'; choose one of: {', '.join(RUNTIMES)}")
    if runtime == "keras":
        return _keras_installed(models)
    found = export_dir(models[0]) if len(models) == 1 else None
    if runtime == "onnx":
        if len(models) != 1:
            raise CaptionerError(
                "--runtime onnx runs one exported folder; several --model folders "
                "decode together on --runtime keras"
            )
        if found is None:
            raise CaptionerError(
                f"{models[0]} has no ONNX export ({EXPORT_DIR}/{MANIFEST_FILE}); "
                f"make one with `captioner export {models[0]} --out "
                f"{Path(models[0]) / EXPORT_DIR}`"
            )
        if importlib.util.find_spec("onnxruntime") is None:
            raise CaptionerError("--runtime onnx needs onnxruntime: pip install onnxruntime")
        return "onnx"
    if found is None or weights != "best" or importlib.util.find_spec("onnxruntime") is None:
        return _keras_installed(models)
    return "onnx"


def _keras_installed(models: Sequence[str | os.PathLike]) -> str:
    """``"keras"``, or one line saying what to install (a runtime-only install lacks Keras)."""
    if importlib.util.find_spec("keras") is None:
        raise CaptionerError(
            f"{models[0]} runs on Keras, which is not installed (a runtime-only install runs "
            "exported models only): pip install captioner with its dependencies, or export "
            "the run with `captioner export` where Keras is installed"
        )
    return "keras"


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(
            f"{path}: cannot read the export's manifest ({exc}); re-export the "
            "model with `captioner export`"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        raise ExportError(
            f"{path} is not a captioner ONNX export manifest; re-export the model "
            "with `captioner export`"
        )
    return manifest


def check_export(folder: Path, manifest: dict[str, Any], run_files: dict | None = None) -> None:
    """Every file of the export has its manifest size and sha256, and (inside a run folder) the
    export was made from the run's own files."""
    for name, ref in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            raise ExportError(
                f"{path} is missing from the export; re-export the model with `captioner export`"
            )
        if path.stat().st_size != ref.get("size") or sha256sum(path) != ref.get("sha256"):
            raise ExportError(
                f"{path} does not match {folder / MANIFEST_FILE} (size or sha256 "
                "differs: damaged or replaced); re-export the model with "
                "`captioner export`"
            )
    source = manifest.get("source", {}).get("files", {}) if run_files else {}
    for name, digest in source.items():
        if name in run_files and run_files[name].get("sha256") != digest:
            raise ExportError(
                f"{folder / MANIFEST_FILE} was exported from another {name} than "
                f"the run folder's; re-export with `captioner export "
                f"{folder.parent} --out {folder}`"
            )
    if source and (added := sorted(set(run_files) - set(source))):  # e.g. `captioner neighbours`
        raise ExportError(
            f"{folder / MANIFEST_FILE} was exported before the run folder gained {added[0]}; "
            f"re-export with `rm -r {folder} && captioner export {folder.parent}`"
        )


def _session(path: Path, threads: int | None = None, arena: bool = True):
    """An ONNX Runtime CPU session; ``threads``: intra-op threads (None: ONNX Runtime's
    default, one per core). ``CAPTIONER_ONNX_THREADS`` overrides both."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    threads = int(os.environ.get("CAPTIONER_ONNX_THREADS", 0)) or threads
    if threads:
        options.intra_op_num_threads = threads
    options.enable_cpu_mem_arena = arena
    # threads sleep between ops instead of spinning: a spinning pool burns the cores the rest
    # of the work needs (bundled export, loaded 2-core machine, create + 1 photo + 20 beam
    # steps, median of 7: 665 ms wall / 294 ms CPU spinning, 481 ms / 196 ms not)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ExportError(
            f"{path} cannot be loaded by ONNX Runtime "
            f"({' '.join(str(exc).split())[:160]}); re-export the model"
        ) from None


class OnnxCaptioner(Captioner):
    """A captioner running an export folder on ONNX Runtime (see the module docstring)."""

    runtime = "onnx"

    def __init__(self, folder: str | os.PathLike, config=None, run_files: dict | None = None):
        folder = Path(folder)
        manifest = _read_manifest(folder)
        check_export(folder, manifest, run_files)
        self.folder, self.manifest = folder, manifest
        self.config = config
        self.tokenizer = Tokenizer.load(folder / TOKENIZER_FILE)
        stored = json.loads((folder / DECODING_FILE).read_text(encoding="utf-8"))
        self.decoding = (
            config.decoding
            if config is not None
            else DecodingConfig.from_dict(stored, str(folder / DECODING_FILE))
        )
        dec = manifest["decoder"]
        self.decoder = SimpleNamespace(kind=dec["kind"], feature_shape=tuple(dec["feature_shape"]))
        self.members_count = int(dec["members"])
        self._init_out, self._step_in = dec["init_outputs"], dec["step_inputs"]
        self._step_out = dec["step_outputs"]
        self._blocks = "per_image_inputs" in dec  # else: one row of features per beam row
        # no memory arena for the encoder: an arena keeps the largest batch's activations
        # (measured: 469 MiB after batches of 16 with it, 173 MiB without, same speed)
        self._encoder_session = _session(folder / ENCODER_FILE, arena=False)
        # the decoder's ops are small: thread hand-offs cost more than they give (measured:
        # a 3-row step 5.5 ms on one thread, 12 ms on two; 384 rows 269 ms against 434 ms)
        self._init_session = _session(folder / INIT_FILE, threads=1)
        self._step_session = _session(folder / STEP_FILE, threads=1)
        self.run_dir = folder.parent if config is not None else folder
        self.grounding = Grounding.from_run(folder, manifest.get("grounding"),
                                            self.tokenizer.words)
        self.neighbours = Neighbours.from_run(folder, manifest.get("grounding"))
        self._searched, self._encoded, self._encoder = True, True, None

    # ------------------------------------------------------------------ images

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.manifest["encoder"]["input_size"])

    @property
    def resample(self) -> str:
        return self.manifest["encoder"]["resample"]

    def encoder(self):
        """The encoder session (loaded with the export)."""
        return self._encoder_session

    def _encode_batch(self, images: np.ndarray) -> np.ndarray:
        """Features for decoded RGB images (B, H, W, 3) in [0, 255], one session call."""
        pixels = np.ascontiguousarray(images, dtype=np.float32)
        return np.asarray(self._encoder_session.run(None, {"image": pixels})[0], dtype="float32")

    # ------------------------------------------------------------------ search

    def _eager_first(self, batch: int) -> bool:
        return False

    def _initial(self, features: np.ndarray) -> dict[str, np.ndarray]:
        feats = np.ascontiguousarray(features, dtype=np.float32)
        outs = self._init_session.run(None, {"features": feats})
        return dict(zip(self._init_out, outs, strict=True))

    def _stepper(self, features: np.ndarray):
        """(per-image inputs, per-beam state per member, raw step): the per-image inputs
        (features, projected keys) once per image; ``raw(tokens, beams, rows)`` feeds ``rows``
        as the per-image inputs and returns every output of the step graph."""
        state = self._initial(features)
        shared = {n: v for n, v in state.items() if n.split("_")[-1] in STATIC_STATE}
        beams = [
            {
                n: v
                for n, v in state.items()
                if n.startswith(f"m{i}_") and n not in shared and not n.endswith("_alpha")
            }
            for i in range(self.members_count)
        ]

        def raw(tokens: np.ndarray, dyn: list[dict[str, np.ndarray]], rows: dict):
            feed = {"tokens": np.asarray(tokens, dtype=np.int32), **rows}
            for part in dyn:
                feed.update(part)
            out = dict(zip(self._step_out, self._step_session.run(None, feed), strict=True))
            return out, [{n: out[n] for n in part} for part in dyn]

        return shared, beams, raw

    def prepare(self, features: np.ndarray, eager: bool = False):
        """(state, step) as :meth:`Captioner.prepare`; an ensemble's log-probs are averaged as
        :func:`captioner.inference.captioner.mean_step` does. An export made before the step graph took
        its per-image inputs once per image gets them gathered per row."""
        shared, beams, raw = self._stepper(features)
        members = self.members_count

        def grouped(tokens: np.ndarray, dyn: list[dict[str, np.ndarray]], rows: dict):
            out, new = raw(tokens, dyn, rows)
            log_probs = [out[f"log_probs_{i}"] for i in range(members)]
            return (log_probs[0] if members == 1 else np.mean(log_probs, axis=0)), new

        step = indexed_step(grouped, shared, len(features), numpy_take, blocks=self._blocks)
        return indexed_state(beams, len(features)), step

    # ------------------------------------------------------------------ attention

    @property
    def grid(self) -> tuple[int, int]:
        return grid_of(self.decoder.feature_shape)

    def attention(
        self, features: np.ndarray, captions: Sequence[Sequence[int]]
    ) -> list[np.ndarray]:
        """Attention weights (len(tokens) + 1, h, w) of the first member, teacher-forced through
        the exported step (as the Keras runtime's :meth:`Captioner.attention`)."""
        if "alpha" not in self._step_out:
            raise CaptionerError(
                f"this run's decoder is '{self.decoder.kind}', which has no "
                "attention; use a run trained with --decoder attention"
            )
        longest = max((len(c) for c in captions), default=0)
        inputs = np.zeros((len(captions), longest + 1), dtype="int32")
        inputs[:, 0] = START
        for row, tokens in enumerate(captions):
            inputs[row, 1 : len(tokens) + 1] = tokens
        rows, dyn, raw = self._stepper(np.asarray(features, "float32"))
        alphas = []
        for t in range(inputs.shape[1]):
            out, dyn = raw(inputs[:, t], dyn, rows)
            alphas.append(out["alpha"])
        stacked = np.stack(alphas, axis=1)  # (B, T, L)
        return [
            np.asarray(stacked[row, : len(t) + 1], "float32").reshape(-1, *self.grid)
            for row, t in enumerate(captions)
        ]


def load_exported(folder: str | os.PathLike) -> OnnxCaptioner:
    """The ONNX captioner of a run folder carrying an export (its config read and checked, the
    export checked against it) or of a bare export folder."""
    folder = Path(folder)
    found = export_dir(folder)
    if found is None:
        raise ExportError(f"{folder} has no ONNX export ({EXPORT_DIR}/{MANIFEST_FILE})")
    if found == folder:
        return OnnxCaptioner(found)
    from captioner.formats.run_folder import RunConfig

    config = RunConfig.load(folder)
    return OnnxCaptioner(found, config, config.files)

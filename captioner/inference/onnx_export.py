"""``captioner export``: a run folder as a self-contained ONNX folder (Keras 3's own exporter,
``model.export(path, format="onnx")``, which runs tf2onnx on the TensorFlow backend).

The folder holds ``encoder.onnx`` (pixels in [0, 255] -> features; the preprocessing is inside),
``init.onnx`` (features -> every member's initial decoder state), ``step.onnx`` (one token of
every member at once: log-probabilities, new state, the first member's attention weights; the
inputs listed as ``per_image_inputs``, features and keys, have one row per image while the
per-beam ones have k rows per image, image-major: :mod:`captioner.inference.per_image`),
``tokenizer.json``, ``decoding.json`` (the run's stored decoding) and ``manifest.json``
(what :mod:`captioner.inference.onnx_runtime` needs: state names, shapes, image size, and the size and
sha256 of every file, the run files it was made from, producer and opset versions). The members
of an ensemble are fused into one graph: one ONNX Runtime call per token instead of one per
member. Weights that float16 holds exactly (the run's weights files store float16) are stored as
float16 and cast back to float32 inside the graph, so the arithmetic is the Keras model's.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from captioner.errors import CaptionerError
from captioner.inference.onnx_runtime import (
    DECODING_FILE,
    ENCODER_FILE,
    EXPORT_FORMAT,
    INIT_FILE,
    MANIFEST_FILE,
    STEP_FILE,
    TOKENIZER_FILE,
    state_names,
)
from captioner.storage.files import sha256sum, write_json

SHARED = ("features",)  # init-state entries every member computes alike: exported once
STATIC = ("features", "keys")  # state no step changes (a decoder's ``per_image``)


def _quiet_export(model, path: Path, signature: list) -> None:
    """``model.export`` to ONNX with tf2onnx's and TensorFlow's chatter kept off the terminal."""
    import logging
    import warnings

    for name in ("tf2onnx", "tensorflow"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # tf2onnx probing np.object
        model.export(str(path), format="onnx", verbose=False, input_signature=signature)


def _wrappers(decoders: list) -> tuple[Any, Any, list[str], list[str], list[str]]:
    """Keras models (init, step) over every member, and the init outputs, step inputs and step
    outputs' names in order (``m0_h`` ...: member 0's ``h``)."""
    import keras
    from keras import ops

    first = decoders[0]
    state = first.init_state(np.zeros((1, *first.feature_shape), "float32"))
    keys = sorted(state)
    init_out = state_names(keys, len(decoders))
    step_in = ["tokens", *state_names([k for k in keys if k != "alpha"], len(decoders))]
    dynamic = [k for k in keys if k not in STATIC and k != "alpha"]
    step_out = [f"log_probs_{i}" for i in range(len(decoders))]
    step_out += [f"m{i}_{k}" for i in range(len(decoders)) for k in dynamic]
    step_out += ["alpha"] if "alpha" in keys else []

    class Init(keras.Model):
        def __init__(self):
            super().__init__()
            self.members = decoders

        def call(self, features):
            outs = {}
            for i, dec in enumerate(self.members):
                for k, v in dec.init_state(features).items():
                    outs[f"m{i}_{k}" if k not in SHARED else k] = v
            return [outs[n] for n in init_out]

    class Step(keras.Model):
        def __init__(self):
            super().__init__()
            self.members = decoders

        def call(self, inputs):
            named = dict(zip(step_in, inputs, strict=True))
            outs: dict[str, Any] = {}
            for i, dec in enumerate(self.members):
                st = {k: named.get(f"m{i}_{k}", named.get(k)) for k in keys if k != "alpha"}
                shared = {k: st.pop(k) for k in dec.per_image}  # one row per image block
                logits, new = dec.step_shared(named["tokens"], {**st, "alpha": None}, shared)
                outs[f"log_probs_{i}"] = ops.log_softmax(ops.cast(logits, "float32"), axis=-1)
                outs.update({f"m{i}_{k}": new[k] for k in dynamic})
                if i == 0 and "alpha" in keys:
                    outs["alpha"] = new["alpha"]
            return [outs[n] for n in step_out]

    return Init(), Step(), init_out, step_in, step_out


def _spec(name: str, shape: tuple, dtype: str = "float32"):
    import keras

    return keras.InputSpec(shape=(None, *shape), dtype=dtype, name=name)


def _export_decoder(decoders: list, out: Path) -> dict[str, Any]:
    """init.onnx and step.onnx of every member; returns their names for the manifest."""
    init, step, init_out, step_in, step_out = _wrappers(decoders)
    feature_shape = tuple(decoders[0].feature_shape)
    zeros = np.zeros((1, *feature_shape), "float32")
    values = dict(zip(init_out, [np.asarray(v) for v in init(zeros)], strict=True))
    _quiet_export(init, out / INIT_FILE, [_spec("features", feature_shape)])
    signature = [_spec("tokens", (), "int32")]
    signature += [_spec(n, values[n].shape[1:]) for n in step_in[1:]]
    example = [np.full((1,), 2, "int32")] + [values[n] for n in step_in[1:]]
    step(example)  # built before export
    _quiet_export(step, out / STEP_FILE, [signature])
    per_image = [n for n in step_in if n.split("_")[-1] in decoders[0].per_image]
    return {"init_outputs": init_out, "step_inputs": step_in, "step_outputs": step_out,
            "per_image_inputs": per_image}


def store_float16(path: Path, min_size: int = 1024) -> int:
    """Rewrite the float32 initializers of ``path`` that float16 holds exactly as float16 plus
    a Cast back to float32 (lossless: the same values reach every operator). Returns the
    number of tensors converted."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph, casts, kept, converted = model.graph, [], [], 0
    for init in graph.initializer:
        array = numpy_helper.to_array(init)
        if (
            array.dtype == np.float32
            and array.size >= min_size
            and np.array_equal(array.astype(np.float16).astype(np.float32), array)
        ):
            half = numpy_helper.from_array(array.astype(np.float16), init.name + "__f16")
            kept.append(half)
            casts.append(
                helper.make_node(
                    "Cast",
                    [half.name],
                    [init.name],
                    to=onnx.TensorProto.FLOAT,
                    name=init.name + "__cast",
                )
            )
            converted += 1
        else:
            kept.append(init)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return converted


def _versions(files: list[Path]) -> dict[str, Any]:
    import keras
    import onnx
    import tf2onnx

    model = onnx.load(str(files[0]), load_external_data=False)
    return {
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
        "onnx": onnx.__version__,
        "tf2onnx": tf2onnx.__version__,
        "producer": f"{model.producer_name} {model.producer_version}",
        "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "ir_version": model.ir_version,
    }


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """Export the run folder ``run_dir`` (its best weights and members) into the folder ``out``
    (created; must be empty or absent). Returns the manifest written."""
    from captioner.formats.run_folder import TOKENIZER_FILE as RUN_TOKENIZER
    from captioner.inference.loader import load_captioner

    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CaptionerError(f"{out} exists and is not an empty folder; choose a new --out")
    captioner = load_captioner(run_dir, runtime="keras")
    config = captioner.config
    decoders = [m.decoder for m in getattr(captioner, "members", [captioner])]
    start = time.perf_counter()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _quiet_export(
        captioner.encoder(), tmp / ENCODER_FILE, [_spec("image", (*captioner.input_size, 3))]
    )
    names = _export_decoder(decoders, tmp)
    converted = {f: store_float16(tmp / f) for f in (ENCODER_FILE, INIT_FILE, STEP_FILE)}
    shutil.copyfile(run_dir / RUN_TOKENIZER, tmp / TOKENIZER_FILE)
    write_json(tmp / DECODING_FILE, captioner.decoding.to_dict())
    files = [ENCODER_FILE, INIT_FILE, STEP_FILE, TOKENIZER_FILE, DECODING_FILE]
    for name in config.grounding.values():  # the ImageNet head and family map (numpy-only)
        shutil.copyfile(run_dir / name, tmp / name)
        files.append(name)
    enc = config.encoder
    manifest = {
        "format": EXPORT_FORMAT,
        "version": 1,
        "encoder": {
            "name": enc.name,
            "layer": enc.layer,
            "input_size": list(captioner.input_size),
            "resample": captioner.resample,
            "feature_shape": list(enc.feature_shape),
        },
        "decoder": {
            "kind": config.decoder.kind,
            "members": len(decoders),
            "feature_shape": list(decoders[0].feature_shape),
            **names,
        },
        "grounding": dict(config.grounding),
        "source": {"run": run_dir.name, "files": {k: v["sha256"] for k, v in config.files.items()}},
        "float16_tensors": converted,
        "versions": _versions([tmp / STEP_FILE]),
        "seconds": round(time.perf_counter() - start, 1),
        "files": {
            f: {"size": (tmp / f).stat().st_size, "sha256": sha256sum(tmp / f)} for f in files
        },
    }
    write_json(tmp / MANIFEST_FILE, manifest)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return manifest

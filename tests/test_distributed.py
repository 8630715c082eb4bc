"""``captioner train --distribute``: data-parallel training with keras.distribution (JAX).

The JAX test runs in a subprocess with two virtual CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=2``): the same tiny run trained on one
device and on two must give the same first-epoch loss (tolerance 1e-4 relative: the two
devices reduce the gradient in another order), and a distributed run checkpoints and resumes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from captioner.cli import main

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

SCRIPT = r"""
import csv, json, sys
from pathlib import Path
import jax
from helpers import toy_dataset
from captioner.train.distributed import data_parallel, local_devices
from captioner.train.training import TrainConfig, train

tmp = Path(sys.argv[1])
caps, train_h5, val_h5, _ = toy_dataset(tmp, n_images=8)  # 16 samples: two batches of 8
tiny = dict(captions=str(caps), train_features=str(train_h5), val_features=str(val_h5),
            decoder="merge", batch_size=8, embed_dim=16, units=32, dropout=0.0, min_count=1,
            learning_rate=0.02, val_bleu_images=2, patience=0)

def losses(run):
    return [float(r["loss"]) for r in csv.DictReader(open(Path(run) / "history.csv"))]

out = {"devices": len(local_devices())}
with data_parallel(True) as n:
    from captioner.model.decoders import build_decoder
    model = build_decoder("merge", vocab_size=20, max_length=8, feature_shape=(16,),
                          embed_dim=8, units=8)
    out["variable_devices"] = len(model.trainable_variables[0].value.sharding.device_set)
single = train(TrainConfig(out=str(tmp / "single"), epochs=1, **tiny), verbose=0)
dist = train(TrainConfig(out=str(tmp / "dist"), epochs=1, distribute=True, **tiny), verbose=0)
out["single"], out["dist"] = losses(single), losses(dist)
out["checkpoint"] = (dist / "checkpoint.h5").is_file()
train(TrainConfig(out=str(dist), captions="", train_features="", epochs=2, distribute=True),
      resume=True, verbose=0)
out["resumed"] = losses(dist)
with open(caps, "a") as f:  # 17 samples: the last batch (1) is padded to the 2 devices
    f.write("img000.jpg#2\ta dog runs on the grass\n")
odd = train(TrainConfig(out=str(tmp / "odd"), epochs=1, distribute=True, **tiny), verbose=0)
out["odd"] = losses(odd)
print("RESULT " + json.dumps(out))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="XLA host devices")
def test_two_virtual_devices_match_one_and_resume(tmp_path):
    pytest.importorskip("jax")
    env = {**os.environ, "KERAS_BACKEND": "jax", "CUDA_VISIBLE_DEVICES": "",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    print("losses", result)  # shown with -s: the numbers behind the tolerance
    assert result["devices"] == 2 and result["variable_devices"] == 2
    assert result["single"][0] == pytest.approx(result["dist"][0], rel=1e-4)
    assert result["checkpoint"] and len(result["resumed"]) == 2
    assert result["resumed"][0] == result["dist"][0] and result["resumed"][1] < result["dist"][0]
    assert len(result["odd"]) == 1 and 0 < result["odd"][0] < 10


def test_distribute_on_tensorflow_is_a_clear_error(tmp_path, capsys):
    keras = pytest.importorskip("keras")
    if keras.backend.backend() == "jax":
        pytest.skip("this process runs JAX: --distribute is supported")
    from helpers import toy_dataset

    caps, train_h5, _, _ = toy_dataset(tmp_path, n_images=4)
    argv = ["train", "--captions", str(caps), "--train-features", str(train_h5),
            "--out", str(tmp_path / "run"), "--distribute", "--quiet"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        f"--distribute needs the JAX backend (keras.distribution); this is {keras.backend.backend()}"
        in err
    )
    assert not (tmp_path / "run").exists()


def test_pad_to_repeats_the_last_sample_with_zero_weight(tmp_path):
    from helpers import toy_dataset

    from captioner.features.cache import open_features
    from captioner.text.tokenizer import Tokenizer
    from captioner.train.batches import CaptionDataset

    caps = {f"img{i:03d}.jpg": ["a dog runs", "the cat sits on the sofa"] for i in range(5)}
    caps["img000.jpg"].append("a red ball")  # 11 samples
    _, train_h5, _, _ = toy_dataset(tmp_path, n_images=5)
    tok = Tokenizer.build([c for cs in caps.values() for c in cs], min_count=1)
    plain = CaptionDataset(open_features(train_h5), caps, tok, batch_size=4, shuffle=False)
    padded = CaptionDataset(open_features(train_h5), caps, tok, batch_size=4, shuffle=False,
                            pad_to=2)  # fmt: skip
    (f, x), y, w = plain[2]  # the last batch: 3 samples
    (pf, px), py, pw = padded[2]
    assert len(f) == 3 and len(pf) == len(px) == len(py) == len(pw) == 4
    assert (pf[:3] == f).all() and (px[:3] == x).all() and (pw[:3] == w).all()
    assert (pf[3] == f[2]).all() and (pw[3] == 0).all() and w[2].sum() > 0
    assert len(padded[0][0][0]) == 4  # full batches are left alone

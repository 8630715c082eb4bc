"""`captioner fit`: checks, splits, dry run, the whole pipeline, and resuming after an interruption."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import FLICKR_IMAGES, FLICKR_TEXT, ROOT, needs_flickr, needs_mobilenet
from test_features import TINY, make_images

from captioner.cli import main
from captioner.encoders import specs as encoders
from captioner.fit.pipeline import seeded_splits

WORDS = ["dog", "cat", "bird", "runs", "sits", "jumps", "grass", "sofa", "snow"]
TINY_ARGS = ["--preset", "classic", "--encoder", "tiny", "--layer", "pool", "--weights",
             "random", "--epochs", "3", "--batch-size", "4", "--quiet"]  # fmt: skip


@pytest.fixture
def tiny_encoder(monkeypatch):
    monkeypatch.setitem(encoders.SPECS, "tiny", TINY)


def photos_and_csv(tmp: Path, n: int = 24) -> tuple[Path, Path]:
    """``n`` random photos and a Kaggle CSV with two captions each."""
    paths = make_images(tmp / "photos", n)
    rows = ["image,caption"]
    for i, path in enumerate(paths):
        a, b, c = WORDS[i % 3], WORDS[3 + i % 3], WORDS[6 + i % 3]
        rows += [f"{path.name},a {a} {b} on the {c}", f"{path.name},the {a} {b} in {c}"]
    (tmp / "captions.csv").write_text("\n".join(rows) + "\n")
    return tmp / "captions.csv", tmp / "photos"


# --------------------------------------------------------------------------- splits and checks


def test_seeded_split_is_deterministic_and_independent_of_order():
    names = [f"p{i:03d}.jpg" for i in range(50)]
    a = seeded_splits(names, 0, 0.1, 0.1)
    assert {k: len(v) for k, v in a.items()} == {"train": 40, "dev": 5, "test": 5}
    assert a == seeded_splits(list(reversed(names)), 0, 0.1, 0.1)
    assert a != seeded_splits(names, 1, 0.1, 0.1)
    assert sorted(sum(a.values(), [])) == names  # disjoint and complete
    assert seeded_splits(names[:2], 0, 0.1, 0.1) == {"train": names[:2], "dev": [], "test": []}


def test_checks_report_counts_and_names_and_strict_stops(tmp_path, tiny_encoder, capsys):
    captions, photos = photos_and_csv(tmp_path, 12)
    with captions.open("a") as f:
        f.write("gone1.png,a dog\ngone2.png,a cat\nempty.png,a bird\n")
    (photos / "empty.png").write_bytes(b"")
    (photos / "extra.png").write_bytes((photos / "img00.png").read_bytes())
    args = ["fit", "--captions", str(captions), "--images-dir", str(photos)]
    assert main([*args, "--out", str(tmp_path / "run"), "--strict", *TINY_ARGS]) == 1
    err = capsys.readouterr().err
    assert "check: 2 captioned photos missing from" in err and "gone1.png, gone2.png" in err
    assert "check: 1 photos without captions (not used): extra.png" in err
    assert "check: 1 unreadable photos (empty or not an image; dropped): empty.png" in err
    assert "check: 1 dev photos only (fewer than 5" in err
    assert "check: 1 test photos only (fewer than 5" in err
    assert "--strict stops here: 5 check(s) failed" in err
    assert not (tmp_path / "run").exists()  # nothing done before the checks

    assert main([*args, "--out", str(tmp_path / "run"), "--dry-run", *TINY_ARGS]) == 0
    out = capsys.readouterr().out
    # 12 usable photos: 10 train, 1 dev, 1 test; pool features of 8 float32 = 32 B per photo
    assert "train      10 photos   features     320 B" in out
    assert "dev         1 photos" in out and "test        1 photos" in out
    assert "32 B per photo, 384 B in all" in out
    assert "extraction: measured" in out and "photos/s" in out
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_bad_options_are_one_line_errors(tmp_path, tiny_encoder, capsys):
    captions, photos = photos_and_csv(tmp_path, 6)
    base = ["fit", "--captions", str(captions), "--out", str(tmp_path / "run")]
    assert main([*base, "--images-dir", str(tmp_path / "nowhere"), *TINY_ARGS]) == 2
    assert "--images-dir" in capsys.readouterr().err
    assert main([*base, "--images-dir", str(photos), "--dev-fraction", "0.7", *TINY_ARGS]) == 2
    assert "--dev-fraction must be above 0 and below 0.5, not 0.7" in capsys.readouterr().err
    assert main([*base, "--images-dir", str(tmp_path), *TINY_ARGS]) == 2  # no photo there
    assert "no training photo" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    base[-1] = str(tmp_path / "file")
    assert main([*base, "--images-dir", str(photos), *TINY_ARGS]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")
    base[-1] = str(tmp_path / "other")
    assert main([*base, "--images-dir", str(photos), *TINY_ARGS]) == 2
    assert "holds a run not made by `captioner fit`" in capsys.readouterr().err
    base[-1] = str(tmp_path / "r")
    assert main([*base, "--images-dir", str(photos), *TINY_ARGS, "--epochs", "0"]) == 2
    assert "--epochs must be at least 1, not 0" in capsys.readouterr().err


# --------------------------------------------------------------------------- interrupted runs


def fit_args(captions: Path, photos: Path, out: Path) -> list[str]:
    return ["fit", "--captions", str(captions), "--images-dir", str(photos), "--out", str(out),
            "--dev-fraction", "0.2", "--test-fraction", "0.2", *TINY_ARGS]  # fmt: skip


def interrupt_after(monkeypatch, owner, method: str, calls: int) -> None:
    """Make ``owner.method`` raise KeyboardInterrupt right after its ``calls``-th call."""
    original = getattr(owner, method)
    count = {"n": 0}

    def wrapped(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        count["n"] += 1
        if count["n"] == calls:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(owner, method, wrapped)


def files_of(folder: Path) -> set[str]:
    """Relative paths of the files in ``folder``; TensorBoard's event files (named by time,
    host and process, one more per resumed session) are left out."""
    found = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    return {p for p in found if not p.startswith("logs/")}


def assert_same_run(out: Path, clean: Path) -> None:
    """``out`` (interrupted and resumed) holds what ``clean`` (one go) holds: the same files,
    identical splits, plan, tokenizer and features; config.json equal but for its creation
    time and the caches' sha256 (each cache file records when it was made); losses, weights
    and test scores equal up to float rounding."""
    assert files_of(out) == files_of(clean)
    assert {"splits/train.txt", "features/dev.h5", "report/report.html", "best.weights.h5",
            "fit.json", "config.json", "history.csv"} <= files_of(out)  # fmt: skip
    for name in ("splits/train.txt", "splits/dev.txt", "splits/test.txt", "fit.json",
                 "tokenizer.json"):  # fmt: skip
        assert (out / name).read_text() == (clean / name).read_text(), name
    for split in ("train", "dev", "test"):
        with (
            h5py.File(out / f"features/{split}.h5", "r", locking=False) as a,
            h5py.File(clean / f"features/{split}.h5", "r", locking=False) as b,
        ):
            for key in ("names", "status", "checksums", "features"):
                np.testing.assert_array_equal(a[key][()], b[key][()])
            attrs = [{k: str(v) for k, v in f.attrs.items() if k != "created"} for f in (a, b)]
            assert attrs[0] == attrs[1]
    rows = [list(csv.DictReader(open(f / "history.csv"))) for f in (out, clean)]
    assert len(rows[0]) == len(rows[1]) == 3
    for a, b in zip(*rows, strict=True):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-4)
    with h5py.File(out / "best.weights.h5") as a, h5py.File(clean / "best.weights.h5") as b:
        keys = []
        a.visit(lambda k: keys.append(k) if isinstance(a[k], h5py.Dataset) else None)
        for key in keys:
            np.testing.assert_allclose(a[key][()], b[key][()], atol=1e-5)
    reports = [json.loads((f / "report" / "report.json").read_text()) for f in (out, clean)]
    assert reports[0]["sections"][0]["metrics"] == pytest.approx(
        reports[1]["sections"][0]["metrics"], abs=1e-6
    )
    configs = [json.loads((f / "config.json").read_text()) for f in (out, clean)]
    for config in configs:  # the caches' bytes differ (their creation time), not their rows
        config.pop("created")
        for key in ("train_features", "val_features"):
            config["sources"][key].pop("sha256")
    assert configs[0] == configs[1]


def test_interrupted_in_extraction_and_in_training_resumes_to_the_same_folder(
    tmp_path, tiny_encoder, capsys
):
    from captioner.features.cache_writer import FeatureWriter
    from captioner.train.monitor import RunMonitor

    captions, photos = photos_and_csv(tmp_path, 20)
    out, clean = tmp_path / "resumed", tmp_path / "clean"
    with pytest.MonkeyPatch.context() as mp:  # killed after 2 of the 3 train batches
        interrupt_after(mp, FeatureWriter, "commit", 2)
        assert main(fit_args(captions, photos, out)) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    with h5py.File(out / "features" / "train.h5", "r", locking=False) as f:
        assert int((f["status"][()] == 1).sum()) == 8  # two batches of 4 kept
    assert not (out / "config.json").exists()
    with pytest.MonkeyPatch.context() as mp:  # killed after epoch 2 of 3
        interrupt_after(mp, RunMonitor, "on_epoch_end", 2)
        assert main(fit_args(captions, photos, out)) == 130
    assert len((out / "history.csv").read_text().splitlines()) == 3  # header + 2 epochs
    assert not (out / "report").exists()
    assert main(fit_args(captions, photos, out)) == 0
    assert main(fit_args(captions, photos, clean)) == 0
    capsys.readouterr()

    assert_same_run(out, clean)


def test_rerun_after_the_end_does_nothing_and_other_splits_are_refused(
    tmp_path, tiny_encoder, capsys
):
    captions, photos = photos_and_csv(tmp_path, 10)
    out = tmp_path / "run"
    assert main(fit_args(captions, photos, out)) == 0
    before = {p: (out / p).stat().st_mtime_ns for p in files_of(out)}
    capsys.readouterr()
    assert main(fit_args(captions, photos, out)) == 0
    assert "[evaluate] done before" in capsys.readouterr().out
    assert {p: (out / p).stat().st_mtime_ns for p in ("best.weights.h5", "features/train.h5",
            "report/report.json")} == {p: before[p] for p in ("best.weights.h5",  # fmt: skip
            "features/train.h5", "report/report.json")}  # fmt: skip
    assert main([*fit_args(captions, photos, out), "--seed", "7"]) == 2
    assert "was started with another" in capsys.readouterr().err


# --------------------------------------------------------------------------- real photos


def karpathy_file(path: Path, n: int = 30) -> Path:
    """A Karpathy split file of the first ``n`` Flickr8k training photos (20 train, 5 val,
    5 test) with their five captions each."""
    from captioner.text.captions import load_captions, load_split

    names = load_split(FLICKR_TEXT / "Flickr_8k.trainImages.txt")[:n]
    captions = load_captions(FLICKR_TEXT / "Flickr8k.token.txt")
    images = [{"filename": name, "split": "train" if i < n - 10 else "val" if i < n - 5 else "test",
               "sentences": [{"raw": c, "tokens": c.lower().split()} for c in captions[name]]}
              for i, name in enumerate(names)]  # fmt: skip
    path.write_text(json.dumps({"images": images, "dataset": "flickr8k"}))
    return path


@pytest.mark.shared
@needs_flickr
@needs_mobilenet
def test_fit_a_karpathy_file_end_to_end_then_caption(tmp_path, capsys):
    data = karpathy_file(tmp_path / "dataset_tiny.json")
    out = tmp_path / "mine"
    argv = ["fit", "--captions", str(data), "--images-dir", str(FLICKR_IMAGES), "--out", str(out),
            "--preset", "classic", "--encoder", "mobilenet_v2_0.5", "--layer", "pool",
            "--epochs", "8", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"splits: the Karpathy splits of {data}" in printed
    sizes = json.loads((out / "fit.json").read_text())["sizes"]
    assert sizes == {"train": 20, "dev": 5, "test": 5}
    config = json.loads((out / "config.json").read_text())
    assert config["preset"] == "classic" and config["decoder"]["kind"] == "merge"
    assert config["encoder"]["name"] == "mobilenet_v2_0.5" and config["train_images"] == 20
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["n_images"] == 5
    photo = FLICKR_IMAGES / (out / "splits" / "test.txt").read_text().split()[0]
    assert main(["caption", str(photo), "--model", str(out), "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    from captioner.text.tokenizer import Tokenizer

    words = set(Tokenizer.load(out / "tokenizer.json").words)
    assert record["image"].endswith(photo.name) and record["caption"]
    assert set(record["caption"].split()) <= words


# --------------------------------------------------------------------------- several files


def karpathy_part(path: Path, entries: list[tuple[str, str | None, str]]) -> Path:
    """A Karpathy file of ``(name under set/, split, caption)`` entries."""
    images = [{"filepath": "set", "filename": name, "split": split,
               "sentences": [{"raw": caption}, {"raw": f"the {caption}"}]}
              for name, split, caption in entries]  # fmt: skip
    path.write_text(json.dumps({"images": images}))
    return path


def test_two_caption_files_in_fit_evaluate_and_train_with_a_karpathy_split(
    tmp_path, tiny_encoder, capsys, caplog
):
    paths = make_images(tmp_path / "photos" / "set", 12)
    (tmp_path / "photos" / "set" / "extra.png").write_bytes(paths[0].read_bytes())
    caption = [f"{WORDS[i % 3]} {WORDS[3 + i % 3]} on {WORDS[6 + i % 3]}" for i in range(12)]
    first = karpathy_part(
        tmp_path / "part1.json", [(p.name, "train", caption[i]) for i, p in enumerate(paths[:8])]
    )
    second = karpathy_part(tmp_path / "part2.json", [
        (paths[0].name, "test", "a clash"),
        ("extra.png", None, "a photo in no split"),
        *[(p.name, "val" if i < 2 else "test", caption[8 + i]) for i, p in enumerate(paths[8:])],
    ])  # fmt: skip
    photos, out = tmp_path / "photos", tmp_path / "run"
    captions = [str(first), str(second)]
    assert main(["fit", "--captions", *captions, "--images-dir", str(photos), "--out", str(out),
                 *TINY_ARGS]) == 0  # fmt: skip
    assert "1 image name(s) also in an earlier caption file" in caplog.text
    assert "check: 1 captioned photos in no Karpathy split (not used): set/extra.png" in (
        capsys.readouterr().err
    )
    assert json.loads((out / "fit.json").read_text())["sizes"] == {"train": 8, "dev": 2, "test": 2}
    assert (out / "splits" / "test.txt").read_text() == "set/img10.png\nset/img11.png\n"
    merged = json.loads((out / "config.json").read_text())["sources"]["captions"]
    assert merged["name"].startswith("captions-merged-") and (out / merged["path"]).is_file()
    own = json.loads((out / "report" / "report.json").read_text())
    capsys.readouterr()

    report = tmp_path / "report"
    assert main(["evaluate", "--model", str(out), "--captions", *captions, "--images-dir",
                 str(photos), "--split", "test", "--preset", "classic", "--out", str(report),
                 "--quiet"]) == 0  # fmt: skip
    assert (report / "split-test.txt").read_text() == "set/img10.png\nset/img11.png\n"
    again = json.loads((report / "report.json").read_text())
    assert again["n_images"] == own["n_images"] == 2
    assert again["sections"][0]["metrics"] == pytest.approx(own["sections"][0]["metrics"])

    run = tmp_path / "train"
    assert main(["train", "--captions", *captions, "--train-features", str(out / "features/train.h5"),
                 "--out", str(run), "--preset", "classic", "--epochs", "1", "--units", "8",
                 "--embed-dim", "8", "--min-count", "1", "--quiet"]) == 0  # fmt: skip
    sources = json.loads((run / "config.json").read_text())["sources"]
    assert sources["captions"]["sha256"] == merged["sha256"]  # the same merged file


def test_two_photos_train_without_dev_and_test(tmp_path, tiny_encoder, capsys):
    captions, photos = photos_and_csv(tmp_path, 2)
    out = tmp_path / "run"
    assert main(fit_args(captions, photos, out)) == 0
    printed = capsys.readouterr().out
    assert "[extract dev] no photos: skipped" in printed and "no test photos: skipped" in printed
    assert json.loads((out / "fit.json").read_text())["sizes"] == {"train": 2, "dev": 0, "test": 0}
    assert not (out / "features" / "dev.h5").exists() and not (out / "report").exists()
    assert (out / "last.weights.h5").is_file()  # no dev to select on: caption uses the last


def test_mirror_extracts_the_training_photos_mirrored_and_trains_on_both(tmp_path, tiny_encoder,
                                                                          capsys):
    captions, photos = photos_and_csv(tmp_path, 10)
    out = tmp_path / "run"
    assert main([*fit_args(captions, photos, out), "--mirror"]) == 0
    printed = capsys.readouterr().out
    assert "train, mirrored: features" in printed
    assert f"[extract train_mirror] 6 photos -> {out / 'features' / 'train_mirror.h5'}" in printed
    with h5py.File(out / "features" / "train_mirror.h5", "r", locking=False) as mirrored, \
            h5py.File(out / "features" / "train.h5", "r", locking=False) as plain:
        assert bool(mirrored.attrs["mirrored"]) and not bool(plain.attrs["mirrored"])
        assert list(mirrored["names"][()]) == list(plain["names"][()])
        assert not np.allclose(mirrored["features"][()], plain["features"][()])
    config = json.loads((out / "config.json").read_text())
    assert config["sources"]["mirrored_features"]["name"] == "train_mirror.h5"
    assert json.loads((out / "fit.json").read_text())["mirror"] is True
    assert (out / "report" / "report.html").is_file()


KILLABLE = """
import sys, time
sys.path.insert(0, {tests!r})
from test_features import register_tiny
from captioner.features.cache_writer import FeatureWriter
from captioner.train.monitor import RunMonitor

register_tiny()
delay = float(sys.argv[1])
set_status, epoch_end = FeatureWriter._set_status, RunMonitor.on_epoch_end

def slow_status(self, rows, value):  # a window for the kill inside each extraction batch
    if rows:
        time.sleep(delay)
    set_status(self, rows, value)

def slow_epoch(self, epoch, logs=None):  # and after each epoch's checkpoint
    epoch_end(self, epoch, logs)
    time.sleep(delay)

FeatureWriter._set_status, RunMonitor.on_epoch_end = slow_status, slow_epoch
from captioner.cli import main
sys.exit(main(sys.argv[2:]))
"""


def fit_process(delay: float, argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    script = KILLABLE.format(tests=str(ROOT / "tests"))
    return subprocess.Popen([sys.executable, "-c", script, str(delay), *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def kill_when(proc: subprocess.Popen, ready) -> str:
    """SIGKILL ``proc`` as soon as ``ready()``; returns its output."""
    deadline = time.monotonic() + 240
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the stage never got going"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    return out


@pytest.mark.meteor  # the killed runs are subprocesses, which find Java: so does the reference
def test_sigkill_in_extraction_then_in_training_resumes_to_the_same_folder(
    tmp_path, tiny_encoder, capsys
):
    from captioner.features.cache import FeatureReader

    captions, photos = photos_and_csv(tmp_path, 20)
    out, clean = tmp_path / "killed", tmp_path / "clean"
    argv = fit_args(captions, photos, out)
    train_h5, history = out / "features" / "train.h5", out / "history.csv"

    def extracted() -> int:
        if not train_h5.exists():
            return 0
        with FeatureReader(train_h5) as reader:
            return reader.counts()["done"]

    kill_when(fit_process(0.3, argv), lambda: extracted() >= 4)
    assert 4 <= extracted() < 12 and not (out / "config.json").exists()
    printed = kill_when(fit_process(1.0, argv),
                        lambda: history.exists() and len(history.read_text().splitlines()) >= 2)  # fmt: skip
    found = re.search(r"\[extract train\] extracted (\d+), skipped (\d+)", printed)
    assert found and int(found[2]) >= 4 and int(found[1]) + int(found[2]) == 12  # resumed
    assert not (out / "report").exists()
    last = fit_process(0, argv)
    stdout, stderr = last.communicate(timeout=600)
    assert last.returncode == 0, stderr[-2000:]
    assert "[extract train] extracted 0, skipped 12" in stdout
    assert "[evaluate] 4 test photos" in stdout
    assert main(fit_args(captions, photos, clean)) == 0
    capsys.readouterr()
    assert_same_run(out, clean)

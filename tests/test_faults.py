"""Faults of the machine (captioner.storage.faults): a full disk, a read-only file system, a
permission, a path component that is a file, too many open files, a folder removed. Each is
one line and exit 2 on every writing command, never a traceback or a crash, and the same
command completes once the fault is gone (extraction bit-identical to a clean run).

Two kinds of tests: ``OSError`` injected at the write calls (everywhere), and real small
tmpfs mounts, full or read-only, driving the CLI in a subprocess (root on Linux only: CI)."""

from __future__ import annotations

import csv
import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
from conftest import ROOT
from test_features import TINY, make_images

from captioner.cli import main
from captioner.encoders import specs as encoders
from captioner.errors import MachineFaultError
from captioner.features.cache import FeatureReader
from captioner.features.cache_writer import FeatureWriter
from captioner.inference import caption_lines
from captioner.inference.caption_lines import MADE_WITH
from captioner.model.checkpoints import keras_weights_bytes, save_checkpoint
from captioner.storage import faults
from captioner.storage.files import write_json
from captioner.storage.temp_files import target_of, temp_path

TESTS = Path(__file__).resolve().parent
WORDS = ["dog", "cat", "runs", "sits", "grass", "ball"]
N_IMAGES = 24
H5_NO_SPACE = ("Unable to synchronously flush file (file write failed: time = now, filename = "
               "'{name}', file descriptor = 3, errno = 28, error message = 'No space left on "
               "device', buf = 0x1, total write size = 4728, bytes this sub-write = 4728, "
               "offset = 20480)")  # fmt: skip


# --------------------------------------------------------------------------- the one line


@pytest.mark.parametrize(
    "code, expected",
    [
        (errno.ENOSPC, "no space left on the device of {out} (2.0 KB being written, "),
        (errno.EDQUOT, "disk quota exceeded of {out} (2.0 KB being written, "),
        (errno.EROFS, "{folder} is on a read-only file system, so {out} cannot be written"),
        (errno.EACCES, "permission denied writing {out}: choose a folder you may write to"),
        (errno.EPERM, "permission denied writing {out}: choose a folder you may write to"),
        (errno.EMFILE, "too many open files while writing {out} (this process may open "),
        (errno.ENFILE, "too many open files while writing {out} (this process may open "),
    ],
)
def test_each_fault_is_one_line_naming_the_file(tmp_path, code, expected):
    out = tmp_path / "f.h5"
    message = faults.fault_message(OSError(code, os.strerror(code)), out, 2048)
    assert message.startswith(expected.format(out=out, folder=tmp_path)), message
    assert "\n" not in message
    if code == errno.ENOSPC:
        free = faults.size_text(faults.free_bytes(tmp_path))
        assert f"{free} free in {tmp_path}): free some space" in message


def test_a_path_component_that_is_a_file_is_named(tmp_path):
    (tmp_path / "runs").write_text("not a folder")
    out = tmp_path / "runs" / "merge" / "config.json"
    message = faults.fault_message(NotADirectoryError(errno.ENOTDIR, "Not a directory"), out)
    assert message.startswith(f"{tmp_path / 'runs'} is a file, not a folder, so {out}")
    with pytest.raises(MachineFaultError, match="is a file, not a folder"):
        write_json(out, {"a": 1})
    with pytest.raises(MachineFaultError, match=f"^{tmp_path / 'runs'} is a file, not a folder"):
        faults.check_writable(tmp_path / "runs")


def test_a_removed_folder_is_named_only_when_it_is_gone(tmp_path):
    gone = FileNotFoundError(errno.ENOENT, "No such file or directory")
    assert faults.fault_message(gone, tmp_path / "x" / "a.json", writing=True).startswith(
        f"the folder {tmp_path / 'x'} does not exist (or was removed while writing "
        f"{tmp_path / 'x' / 'a.json'})"
    )
    assert faults.fault_message(gone, tmp_path / "a.json", writing=True) is None  # folder there
    assert faults.fault_message(gone, tmp_path / "x" / "a.json") is None  # reads: not a fault
    run = tmp_path / "run"
    run.mkdir()
    run.rmdir()  # the folder removed while a command runs
    with pytest.raises(MachineFaultError, match=f"the folder {run} does not exist \\(or was removed"):
        write_json(run / "history.json", {"epoch": 1})


def test_h5py_messages_give_errno_and_the_target_of_a_temporary_name(tmp_path):
    out = tmp_path / "last.weights.h5"
    tmp = temp_path(out, "part", ".weights.h5")
    assert target_of(tmp) == out and target_of(out) == out
    for kind in (RuntimeError, ValueError, OSError):
        exc = kind(H5_NO_SPACE.format(name=tmp))
        assert faults.fault_errno(exc) == errno.ENOSPC
        assert faults.fault_message(exc).startswith(f"no space left on the device of {out} (")
    assert faults.fault_message(RuntimeError("Can't decrement id ref count")) is None
    assert faults.fault_message(OSError(errno.EAGAIN, "locked")) is None


def test_cli_turns_any_untranslated_fault_into_one_line(monkeypatch, capsys):
    from captioner.commands import extract

    def handler(args):
        raise OSError(errno.EMFILE, "Too many open files", "x.png")

    monkeypatch.setattr(extract, "run_extract", handler)
    assert main(["extract", "imgs", "--out", "f.h5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "captioner extract: error: too many open files while writing x.png"
    )
    assert err.rstrip().endswith(
        "the finished batches are kept: run the same command again to resume"
    )

    def bug(args):
        raise OSError(errno.EAGAIN, "not a machine fault")

    monkeypatch.setattr(extract, "run_extract", bug)
    with pytest.raises(OSError, match="not a machine fault"):
        main(["extract", "imgs", "--out", "f.h5"])


def test_space_is_checked_first(tmp_path, monkeypatch):
    from captioner.features.cache_writer import check_cache_space

    usage = SimpleNamespace(total=1 << 30, used=0, free=100_000)
    monkeypatch.setattr(faults.shutil, "disk_usage", lambda path: usage)
    check_cache_space(tmp_path / "f.h5", 100, (64,), "float32")  # ~59 KB: fits
    with pytest.raises(MachineFaultError, match=r"needs about 1\.3 MB but .* has 97\.7 KB free: "
                       r"free some space \(`--dtype float16` halves"):  # fmt: skip
        check_cache_space(tmp_path / "f.h5", 1000, (256,), "float32")
    with pytest.raises(MachineFaultError) as caught:
        check_cache_space(tmp_path / "f.h5", 1000, (512,), "float16")
    assert "--dtype" not in str(caught.value) and caught.value.before_work


# --------------------------------------------------------------------------- HDF5 files


def _tiny_cache(path: Path, n: int = 12) -> list[str]:
    names = [f"img{i:02d}.png" for i in range(n)]
    FeatureWriter.create(path, names, (4, 4, 8), "float32", {"encoder": "tiny"})
    return names


def test_a_failed_commit_abandons_the_file_and_keeps_what_was_committed(tmp_path, monkeypatch):
    out = tmp_path / "f.h5"
    names = _tiny_cache(out)
    rows = np.random.default_rng(0).normal(size=(12, 4, 4, 8)).astype("float32")
    writer = FeatureWriter(out)
    writer.commit(range(4), rows[:4], {})
    real_flush = h5py.File.flush

    def full(self):
        raise RuntimeError(H5_NO_SPACE.format(name=out))

    monkeypatch.setattr(h5py.File, "flush", full)
    with pytest.raises(MachineFaultError, match=f"^no space left on the device of {out} "
                       r"\(2\.0 KB being written, "):  # fmt: skip
        writer.commit(range(4, 8), rows[4:8], {})
    assert not writer._file.id.valid  # abandoned: never closed as it was
    writer.close()  # a no-op now
    monkeypatch.setattr(h5py.File, "flush", real_flush)
    with FeatureReader(out) as reader:
        assert reader.counts() == {"done": 4, "pending": 8, "failed": 0}
        np.testing.assert_array_equal(reader.read(names[:4]), rows[:4])
        assert reader.verify().ok


def test_abandon_points_writes_at_nothing(tmp_path):
    out = tmp_path / "f.h5"
    _tiny_cache(out)
    f = h5py.File(out, "r+")
    before = out.read_bytes()
    f.attrs["pending"] = "x" * 1000  # in HDF5's metadata cache, not yet on disk
    dataset = f["features"]
    faults.abandon_hdf5(f.id)
    assert not f.id.valid and not dataset.id.valid and out.read_bytes() == before
    with h5py.File(out, "r") as again:
        assert "pending" not in again.attrs
    with FeatureWriter(out) as writer:  # opens again for writing, rows intact
        writer.commit([0], np.zeros((1, 4, 4, 8), "float32"), {})
    with FeatureReader(out) as reader:
        assert reader.counts()["done"] == 1 and reader.verify().ok


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EMFILE])
def test_creating_a_cache_fails_with_one_line_and_leaves_no_temporary_file(tmp_path, monkeypatch,
                                                                          code):  # fmt: skip
    from captioner.features import cache_writer

    real = h5py.File

    def refuse(name, mode="r", **kw):
        if mode in ("w", "r+"):
            raise OSError(code, f"Unable to synchronously create file (unable to open file: "
                          f"name = '{name}', errno = {code})", str(name))  # fmt: skip
        return real(name, mode, **kw)

    monkeypatch.setattr(cache_writer.h5py, "File", refuse)
    with pytest.raises(MachineFaultError) as caught:
        _tiny_cache(tmp_path / "f.h5")
    assert str(tmp_path / "f.h5") in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_keras_weights_are_written_as_bytes_keras_reads(tmp_path):
    import keras

    from captioner.model.decoders import build_decoder

    config = {"vocab_size": 10, "max_length": 6, "feature_shape": [8], "embed_dim": 4,
              "units": 4, "dropout": 0.0}  # fmt: skip
    model = build_decoder("merge", **config)
    (tmp_path / "a.weights.h5").write_bytes(keras_weights_bytes(model))
    model.save_weights(tmp_path / "b.weights.h5")
    for name in ("a", "b"):
        twin = build_decoder("merge", **config)
        twin.load_weights(tmp_path / f"{name}.weights.h5")
        for x, y in zip(model.get_weights(), twin.get_weights(), strict=True):
            np.testing.assert_array_equal(x, y)
    assert keras.__version__  # Keras's own H5IOStore wrote them


def test_a_checkpoint_on_a_full_disk_is_one_line_and_no_temporary_file(tmp_path, monkeypatch):
    from captioner.model.decoders import build_decoder

    model = build_decoder("merge", vocab_size=10, max_length=6, feature_shape=[8], embed_dim=4,
                          units=4, dropout=0.0)  # fmt: skip
    import keras

    model.compile(optimizer=keras.optimizers.Adam(), loss="mse")
    model.optimizer.build(model.trainable_variables)

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(MachineFaultError, match=f"of {tmp_path / 'checkpoint.h5'} "
                       r"\(\d+\.\d KB being written"):  # fmt: skip
        save_checkpoint(tmp_path / "checkpoint.h5", model, 1, {})
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- every command


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Images, their tiny-encoder features, captions and a one-epoch run over them."""
    tmp = tmp_path_factory.mktemp("faults")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(encoders.SPECS, "tiny", TINY)
        _build_pipeline(tmp)
    return tmp


def _build_pipeline(tmp: Path) -> None:
    make_images(tmp / "img", N_IMAGES, seed=5)
    lines = [f"img{i:02d}.png#{k}\ta {WORDS[i % 6]} {WORDS[(i + k) % 6]} on the grass"
             for i in range(N_IMAGES) for k in range(2)]  # fmt: skip
    (tmp / "caps.txt").write_text("\n".join(lines) + "\n")
    (tmp / "test.txt").write_text("".join(f"img{i:02d}.png\n" for i in range(16, N_IMAGES)))
    assert main(["extract", str(tmp / "img"), "--encoder", "tiny", "--out",
                 str(tmp / "clean.h5"), "--batch-size", "4", "--workers", "0"]) == 0  # fmt: skip
    assert main(["extract", str(tmp / "img"), "--encoder", "tiny", "--layer", "pool", "--out",
                 str(tmp / "pool.h5"), "--batch-size", "8", "--workers", "0"]) == 0  # fmt: skip
    assert main(train_args(tmp, tmp / "run", 1)) == 0


def train_args(tmp: Path, out: Path, epochs: int) -> list[str]:
    return ["train", "--preset", "classic", "--captions", str(tmp / "caps.txt"),
            "--train-features", str(tmp / "pool.h5"), "--out", str(out), "--epochs",
            str(epochs), "--batch-size", "8", "--embed-dim", "8", "--units", "8",
            "--min-count", "1", "--val-bleu-images", "0", "--patience", "0", "--quiet"]  # fmt: skip


def command_args(tmp: Path, command: str, out: Path) -> list[str]:
    """The CLI arguments of each writing command, writing to ``out``."""
    return {
        "extract": ["extract", str(tmp / "img"), "--encoder", "tiny", "--out", str(out),
                    "--batch-size", "4", "--workers", "0"],
        "train": train_args(tmp, out, 3),
        "caption": ["caption", str(tmp / "img"), "--model", str(tmp / "run"), "--out", str(out),
                    "--batch-size", "8"],
        "evaluate": ["evaluate", "--model", str(tmp / "run"), "--captions", str(tmp / "caps.txt"),
                     "--features", str(tmp / "pool.h5"), "--split", str(tmp / "test.txt"),
                     "--out", str(out), "--quiet"],
    }[command]  # fmt: skip


OUTPUTS = {"extract": "f.h5", "train": "run", "caption": "captions.jsonl", "evaluate": "report"}


def assert_one_line(err: str, command: str) -> None:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert 1 <= len(lines) <= 2 and lines[-1].startswith(f"captioner {command}: error: "), err


def assert_complete(tmp: Path, command: str, out: Path) -> None:
    """What the same command leaves once it completed."""
    if command == "extract":
        with FeatureReader(out) as a, FeatureReader(tmp / "clean.h5") as b:
            assert a.names == b.names and a.done_names == a.names
            assert np.array_equal(a.read(a.names), b.read(b.names))  # bit-identical
            assert a.verify().ok
    elif command == "train":
        rows = list(csv.DictReader(open(out / "history.csv")))
        assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    elif command == "caption":
        made, *lines = [json.loads(line) for line in out.read_text().splitlines()]
        assert set(made) == {MADE_WITH}  # the header line: the model and decoding it was made with
        assert sorted(r["image"] for r in lines) == sorted(str(p) for p in (tmp / "img").iterdir())
    else:
        assert {p.name for p in out.iterdir()} >= {"report.json", "report.md", "report.html"}
    assert not [p for p in out.parent.rglob(".*.tmp*")], "temporary files left"


@pytest.fixture()
def tiny_encoder(monkeypatch):
    monkeypatch.setitem(encoders.SPECS, "tiny", TINY)


def _raise(code: int):
    raise OSError(code, os.strerror(code))


def inject(monkeypatch, command: str, code: int) -> None:
    """Fail one write of ``command`` (after some work) with ``OSError(code)``."""
    if command == "extract":  # the third batch's status
        calls = {"n": 0}
        real = FeatureWriter._set_status

        def status(self, rows, value):
            calls["n"] += 1
            if calls["n"] == 5:
                _raise(code)
            real(self, rows, value)

        monkeypatch.setattr(FeatureWriter, "_set_status", status)
    elif command in ("train", "evaluate"):  # last.weights.h5 of epoch 2; report.md
        name = "last.weights.h5" if command == "train" else "report.md"
        seen = {"n": 0}
        real = Path.write_bytes

        def write(self, data):
            if target_of(self).name == name:
                seen["n"] += 1
                if seen["n"] == (2 if command == "train" else 1):
                    _raise(code)
            return real(self, data)

        monkeypatch.setattr(Path, "write_bytes", write)
    else:  # caption --out: the second batch's fsync
        calls = {"n": 0}

        def fsync(fd):
            calls["n"] += 1
            if calls["n"] == 2:
                _raise(code)
            os.fsync(fd)

        monkeypatch.setattr(caption_lines, "os", SimpleNamespace(fsync=fsync))


@pytest.mark.parametrize("command", ["extract", "train", "caption", "evaluate"])
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EMFILE])
def test_injected_fault_is_one_line_then_the_same_command_completes(
    pipeline, tmp_path, monkeypatch, capsys, tiny_encoder, command, code
):
    out = tmp_path / OUTPUTS[command]
    args = command_args(pipeline, command, out)
    with monkeypatch.context() as patch:
        inject(patch, command, code)
        assert main(args) == 2
    err = capsys.readouterr().err
    assert_one_line(err, command)
    assert {
        errno.ENOSPC: "no space left",
        errno.EROFS: "read-only file system",
        errno.EACCES: "permission denied",
        errno.EMFILE: "too many open files",
    }[code] in err
    assert str(out) in err
    if command == "train":
        args += ["--resume"]
    assert main(args) == 0
    assert_complete(pipeline, command, out)


def test_scst_fault_is_one_line(pipeline, tmp_path, monkeypatch, capsys):
    out = tmp_path / "scst"
    args = ["scst", "--init", str(pipeline / "run"), "--captions",
            str(pipeline / "caps.txt"), "--train-features", str(pipeline / "pool.h5"), "--out",
            str(out), "--epochs", "1", "--batch-images", "8", "--val-images", "0", "--quiet"]  # fmt: skip
    with monkeypatch.context() as patch:
        real = Path.write_bytes
        patch.setattr(Path, "write_bytes", lambda self, data: _raise(errno.ENOSPC)
                      if target_of(self).name.endswith(".weights.h5") else real(self, data))  # fmt: skip
        assert main(args) == 2
    err = capsys.readouterr().err
    assert_one_line(err, "scst")
    assert "no space left on the device of" in err and "`captioner scst --out" in err


# --------------------------------------------------------------------------- real tmpfs mounts

RUNNER = """
import os, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from captioner.cli import _quiet_keras_import, main
_quiet_keras_import()
sys.path.insert(0, {tests!r})
from test_features import register_tiny
from captioner.inference.caption_lines import LineWriter
from captioner.features.cache_writer import FeatureWriter
from captioner.train.monitor import RunMonitor
from captioner.evaluation import report

register_tiny()
after, folder = int(sys.argv[1]), sys.argv[2]

def fill():  # another process fills the disk
    fd = os.open(os.path.join(folder, "ballast"), os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\\0" * 4096)
    except OSError:
        pass
    os.close(fd)

def hook(owner, name):
    real, calls = getattr(owner, name), [0]
    def wrapped(*args, **kwargs):
        if calls[0] == after:
            fill()
        calls[0] += 1
        return real(*args, **kwargs)
    setattr(owner, name, wrapped)

if after >= 0:
    for owner, name in ((FeatureWriter, "commit"), (RunMonitor, "_save"),
                        (LineWriter, "write"), (report, "write_curves")):
        hook(owner, name)
sys.exit(main(sys.argv[3:]))
"""


class Mount:
    """A small tmpfs: filled by a ballast file, or remounted read-only."""

    def __init__(self, path: Path):
        self.path = path

    def _mount(self, *options: str) -> None:
        subprocess.run(["mount", *options, str(self.path)], check=True, capture_output=True)

    def read_only(self, yes: bool) -> None:
        self._mount("-o", "remount,ro" if yes else "remount,rw")

    def free(self) -> None:
        (self.path / "ballast").unlink(missing_ok=True)


@pytest.fixture()
def tmpfs(tmp_path):
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root on Linux")
    path = tmp_path / "mnt"
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)],
                          capture_output=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield Mount(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def run_cli(args: list[str], fill_after: int, folder: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = RUNNER.format(tests=str(TESTS))
    return subprocess.run([sys.executable, "-c", script, str(fill_after), str(folder), *args],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip


# the disk fills after this many commits / epochs / caption batches / report files
FILL_AFTER = {"extract": 3, "train": 1, "caption": 1, "evaluate": 0}


@pytest.mark.parametrize("command", ["extract", "train", "caption", "evaluate"])
@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_tmpfs_fault_is_one_line_and_the_same_command_completes_after(
    pipeline, tmpfs, tiny_encoder, command, fault
):
    out = tmpfs.path / "sub" / OUTPUTS[command]
    args = command_args(pipeline, command, out)
    if fault == "read-only":
        tmpfs.read_only(True)
    done = run_cli(args, FILL_AFTER[command] if fault == "full" else -1, tmpfs.path)
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])  # never a signal
    assert_one_line(done.stderr, command)
    expected = "no space left on the device of" if fault == "full" else "read-only file system"
    assert expected in done.stderr
    if fault == "full":
        assert not [p for p in tmpfs.path.rglob(".*.tmp*")], "temporary files left"
        if command == "extract":  # what was committed is valid: three batches of four
            with FeatureReader(out) as reader:
                assert reader.counts() == {"done": 12, "pending": N_IMAGES - 12, "failed": 0}
                assert reader.verify().ok
        tmpfs.free()
    else:
        tmpfs.read_only(False)
    if command == "train" and (out / "checkpoint.h5").exists():
        args += ["--resume"]
    assert main(args) == 0
    assert_complete(pipeline, command, out)
    if command == "extract":  # a finished cache on a read-only disk: nothing to write, no fault
        tmpfs.read_only(True)
        assert main(args) == 0


@pytest.mark.parametrize("code, status", [(errno.ENOSPC, 507), (errno.EROFS, 503)])
def test_the_service_answers_a_fault_of_its_upload_folder(tmp_path, monkeypatch, code, status):
    from captioner.serve import uploads

    def copy(source, path, limit):
        path.write_bytes(b"\xff\xd8")  # a partial copy, removed
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(uploads, "_copy_limited", copy)
    upload = SimpleNamespace(filename="a.jpg", content_type="image/jpeg", file=None)
    decoded = uploads.decode_upload(upload, 0, tmp_path, (8, 8), uploads.Limits())
    failure = decoded.failure
    assert (decoded.name, decoded.pixels, failure.status) == ("a.jpg", None, status)
    assert failure.reason.startswith("the server cannot store uploads now (")
    assert str(tmp_path) not in failure.reason and list(tmp_path.iterdir()) == []

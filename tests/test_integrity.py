"""Feature-cache integrity: row checksums, damaged rows named and re-extracted, old caches,
non-finite outputs, truncated files, stale temporary files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
from PIL import Image
from test_features import IDENTITY, make_images, run_tiny, tiny_encoder, tiny_model  # noqa: F401

from captioner.cli import main
from captioner.errors import CaptionerError
from captioner.features.cache import DamagedFeaturesError, FeatureReader
from captioner.features.cache_writer import FeatureWriter
from captioner.features.checksums import UNVERIFIED
from captioner.storage.temp_files import _HOST, remove_stale, temp_path

DATASETS = ("features", "names", "status", "errors", "checksums")


def datasets(path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in DATASETS if k in f}


def damage(path, row: int, how: str) -> None:
    """Overwrite raw data of one row in place (what a bad disk or a stray write does)."""
    with h5py.File(path, "r+") as f:
        feats = f["features"]
        value = feats[row]
        if how == "flip":  # one bit of one value
            raw = value.view(np.uint32)
            raw.flat[3] ^= 1 << 20
            value = raw.view(feats.dtype)
        elif how == "block":
            value[...] = 1e30
        elif how == "nan":
            value.flat[0] = np.nan
        feats[row] = value


@pytest.fixture
def clean(tmp_path, tiny_model):  # noqa: F811
    paths = make_images(tmp_path / "imgs", 12)
    run_tiny(paths, tmp_path / "clean.h5", tiny_model)
    return SimpleNamespace(paths=paths, path=tmp_path / "clean.h5", names=[p.name for p in paths])


def test_damaged_rows_are_named_and_re_extracted_bit_identically(clean, tmp_path, tiny_model):  # noqa: F811
    bad = tmp_path / "bad.h5"
    shutil.copy(clean.path, bad)
    for row, how in ((3, "flip"), (7, "block"), (9, "nan")):
        damage(bad, row, how)
    with FeatureReader(bad) as reader:
        with pytest.raises(DamagedFeaturesError, match=r"img03\.png.*bad\.h5.*checksum mismatch"):
            reader.read(clean.names[:5])
        good, feats, failed = reader.read_valid(clean.names)
        assert set(failed) == {"img03.png", "img07.png", "img09.png"}
        assert "not finite" in failed["img09.png"] and "checksum" in failed["img07.png"]
        assert good == [n for n in clean.names if n not in failed] and len(feats) == 9
        report = reader.verify()
    assert (report.done, report.verified, report.unverified, len(report.damaged)) == (12, 9, 0, 3)
    assert "3 damaged (img03.png, img07.png, img09.png)" in report.line()

    summary = run_tiny(clean.paths, bad, tiny_model)
    assert (summary.repaired, summary.done, summary.skipped) == (3, 3, 9)
    want, got = datasets(clean.path), datasets(bad)
    for key in DATASETS:
        assert got[key].tobytes() == want[key].tobytes(), key
    with FeatureReader(bad) as reader:
        assert reader.verify().ok


def test_damaged_status_byte_and_checksum_are_re_extracted(clean, tmp_path, tiny_model):  # noqa: F811
    bad = tmp_path / "bad.h5"
    shutil.copy(clean.path, bad)
    with h5py.File(bad, "r+") as f:
        f["status"][2] = 77  # neither pending, done nor failed
        f["checksums"][5] = 12345
    with FeatureReader(bad) as reader:
        assert reader.status_of("img02.png") == "damaged"
        report = reader.verify()
        assert set(report.damaged) == {"img02.png", "img05.png"}
    summary = run_tiny(clean.paths, bad, tiny_model)
    assert summary.done == 2
    assert datasets(bad)["status"].tobytes() == datasets(clean.path)["status"].tobytes()


def test_non_finite_encoder_outputs_are_refused_when_written(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    paths = []
    for i, value in enumerate((10, 20, 70, 30, 90)):
        paths.append(folder / f"v{i}.png")
        Image.new("RGB", (32, 32), (value, 0, 0)).save(paths[-1])

    class Model:  # red * 1000: 70 and 90 overflow float16 (max 65504) to inf
        output = SimpleNamespace(shape=(None, 2))

        def predict_on_batch(self, x):
            red = x[:, 0, 0, 0].astype("float32")
            return np.stack([red * 1000.0, red], axis=1)

    out = tmp_path / "f16.h5"
    summary = run_tiny(paths, out, Model(), dtype="float16", batch_size=2)
    assert summary.done == 3 and set(summary.failed) == {"v2.png", "v4.png"}
    assert "not finite" in summary.failed["v2.png"]
    with FeatureReader(out) as reader:
        assert reader.status_of("v2.png") == "failed" and "not finite" in reader.failed["v4.png"]
        assert reader.read(["v0.png"])[0, 1] == 10 and reader.verify().ok


def _downgrade(path) -> None:
    """Make a cache look like one written before checksums (format 1)."""
    with h5py.File(path, "r+") as f:
        del f["checksums"]
        f.attrs["format_version"] = 1


def test_caches_without_checksums_load_unverified_and_grow_verified(clean, tmp_path, tiny_model):  # noqa: F811
    old = tmp_path / "old.h5"
    shutil.copy(clean.path, old)
    _downgrade(old)
    with FeatureReader(old) as reader, FeatureReader(clean.path) as new:
        assert not reader.checksummed
        assert np.array_equal(reader.read(clean.names), new.read(clean.names))
        report = reader.verify()
    assert (report.verified, report.unverified, report.ok) == (0, 12, True)
    assert "12 unverified: written before checksums" in report.line()
    damage(old, 4, "nan")  # non-finite values are caught even without checksums
    with FeatureReader(old) as reader:
        assert set(reader.verify().damaged) == {"img04.png"}

    more = make_images(tmp_path / "more", 3, seed=5)
    more = [p.rename(p.with_name(f"new{i}.png")) for i, p in enumerate(more)]
    summary = run_tiny(clean.paths + more, old, tiny_model)  # union: rebuilt in format 2
    assert (summary.done, summary.repaired) == (4, 1)
    with FeatureReader(old) as reader:
        assert reader.checksummed and reader.attrs["format_version"] == 2
        report = reader.verify()
    sums = datasets(old)["checksums"]
    assert (report.verified, report.unverified, report.ok) == (4, 11, True)
    assert (sums[:12] == UNVERIFIED).sum() == 11  # copied rows are never blessed


@pytest.mark.parametrize(
    "content, words",
    [
        ("truncate", "truncated"),
        (b"not an hdf5 file at all", "does not start like one"),
    ],
)
def test_truncated_or_foreign_cache_is_one_line(clean, tmp_path, capsys, content, words):
    path = tmp_path / "broken.h5"
    if content == "truncate":
        path.write_bytes(clean.path.read_bytes()[:5000])
    else:
        path.write_bytes(content)
    for argv in (["extract", "--verify", str(path)], ["caption", "x.png", "--features", str(path)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(path) in err and words in err, err
        assert "Traceback" not in err


def test_verify_cli_text_and_json(clean, tmp_path, capsys):
    assert main(["extract", "--verify", str(clean.path)]) == 0
    assert (
        capsys.readouterr()
        .out.strip()
        .endswith("12 done (12 verified), 0 failed, 0 pending, 0 damaged - OK")
    )
    damage(clean.path, 6, "flip")
    assert main(["extract", "--verify", str(clean.path), "--json"]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0]["image"] == "img06.png" and "checksum" in lines[0]["error"]
    assert lines[0]["file"] == str(clean.path)
    assert lines[-1]["summary"]["damaged"] == 1 and lines[-1]["summary"]["verified"] == 11


# --------------------------------------------------------------------------- temporary files


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.subprocess
def test_stale_temp_files_of_dead_processes_are_removed(clean, tmp_path, tiny_model):  # noqa: F811
    dead, alive = _dead_pid(), os.getppid()
    folder = clean.path.parent
    stale = [
        folder / f".clean.h5.{_HOST}.{dead}.union.tmp",
        folder / f".clean.{dead}.h5.tmp",  # the first release's names
        folder / f"..clean.{dead}.union.h5.{dead}.h5.tmp",
    ]
    kept = [
        folder / f".clean.h5.{_HOST}.{alive}.new.tmp",  # its process still runs
        folder / f".clean.h5.otherhost.{dead}.new.tmp",  # another machine's
        folder / f".other.h5.{_HOST}.{dead}.new.tmp",  # another cache's
    ]
    for path in stale + kept:
        path.write_bytes(b"x")
    summary = run_tiny(clean.paths, clean.path, tiny_model)
    assert summary.skipped == 12
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    assert remove_stale(clean.path) == []


def test_an_interrupted_union_leaves_no_temp_file(clean, tmp_path, tiny_model, monkeypatch):  # noqa: F811
    before = clean.path.read_bytes()

    def boom(self, source):
        raise KeyboardInterrupt

    monkeypatch.setattr(FeatureWriter, "copy_from", boom)
    more = make_images(tmp_path / "more", 2, seed=9)
    more = [p.rename(p.with_name(f"extra{i}.png")) for i, p in enumerate(more)]
    with pytest.raises(KeyboardInterrupt):
        run_tiny(clean.paths + more, clean.path, tiny_model)
    assert clean.path.read_bytes() == before
    assert not [p for p in clean.path.parent.iterdir() if p.name.endswith(".tmp")]
    assert temp_path(clean.path, "x").name.startswith(".clean.h5.")


def test_damaged_cache_metadata_is_one_line(clean):
    with h5py.File(clean.path, "r+") as f:
        del f["status"]
    with pytest.raises(CaptionerError, match="not a captioner feature cache"):
        FeatureReader(clean.path)


def test_extract_cli_json_lines_and_repair(tmp_path, tiny_encoder, capsys):  # noqa: F811
    make_images(tmp_path / "imgs", 4)  # rows: cut.jpg, img00.png ... img03.png
    (tmp_path / "imgs" / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0 only a header")
    out = tmp_path / "f.h5"
    args = ["extract", str(tmp_path / "imgs"), "--encoder", "tiny", "--layer", "pool",
            "--out", str(out), "--json"]  # fmt: skip
    assert main(args) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0] == {"image": "cut.jpg", "error": "truncated image"}
    assert lines[-1]["summary"] | {"seconds": 0} == {
        "command": "extract", "file": str(out), "requested": 5, "done": 4, "skipped": 0,
        "failed": 1, "repaired": 0, "seconds": 0}  # fmt: skip
    clean = datasets(out)
    damage(out, 2, "flip")
    assert main(args[:-1]) == 0
    captured = capsys.readouterr()
    assert (
        "re-extracted 1 damaged" in captured.out and "damaged: img01.png" in captured.err
    )  # row 2
    assert all(datasets(out)[k].tobytes() == clean[k].tobytes() for k in DATASETS)

"""The Ray engine (``--engine ray``) of extract and caption: identical output to the local one.

One Ray session (the ``ray_cluster`` fixture, 2 CPUs) serves every test; the whole module is
skipped where Ray is not installed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import h5py
import numpy as np
import pytest

pytest.importorskip("ray")
pytest.importorskip("ray.data")

from conftest import needs_mobilenet  # noqa: E402
from test_features import IDENTITY, TINY, make_images  # noqa: E402

from captioner.cli import main as cli_main  # noqa: E402
from captioner.encoders import specs as encoders  # noqa: E402
from captioner.engines import ray_extract  # noqa: E402
from captioner.engines.ray_extract import extract_ray  # noqa: E402
from captioner.features.cache import FeatureReader  # noqa: E402
from captioner.features.extraction import extract  # noqa: E402

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
BUILD = partial(TINY.feature_model, "conv", None)


@pytest.fixture
def tiny_encoder(monkeypatch):
    monkeypatch.setitem(encoders.SPECS, "tiny", TINY)


def bad_images(folder: Path) -> list[Path]:
    """An empty file, a truncated PNG and a text file named .jpg."""
    good = make_images(folder, 1, seed=9)[0]
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.png").write_bytes(good.read_bytes()[:200])
    (folder / "text.jpg").write_text("not an image")
    return [folder / "empty.jpg", folder / "truncated.png", folder / "text.jpg"]


def run(engine, paths, out, **kwargs):
    kwargs.setdefault("progress", False)
    kwargs.setdefault("batch_size", 4)
    fn = extract_ray if engine == "ray" else partial(extract, workers=1)
    return fn(paths, out, model=BUILD, identity=IDENTITY, input_size=(32, 32), **kwargs)


def assert_same_cache(a: Path, b: Path) -> None:
    """Every dataset equal byte for byte (failed rows' features excepted: never written),
    every attribute equal but the creation time."""
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        assert set(fa) == set(fb) == {"features", "names", "status", "errors", "checksums"}
        for key in ("names", "status", "errors", "checksums"):
            assert fa[key].dtype == fb[key].dtype and np.array_equal(fa[key][()], fb[key][()]), key
        done = fa["status"][()] == 1
        assert np.array_equal(done, fb["status"][()] == 1) and done.any()
        fa_feats, fb_feats = fa["features"][()], fb["features"][()]
        assert fa_feats.dtype == fb_feats.dtype
        assert fa_feats[done].tobytes() == fb_feats[done].tobytes()
        attrs_a = {k: v for k, v in fa.attrs.items() if k != "created"}
        attrs_b = {k: v for k, v in fb.attrs.items() if k != "created"}
        assert attrs_a.keys() == attrs_b.keys()
        for key, value in attrs_a.items():
            assert np.array_equal(value, attrs_b[key]), key


def test_nothing_to_do_does_not_start_ray(tmp_path, monkeypatch):
    paths = make_images(tmp_path / "imgs", 3)
    run("local", paths, tmp_path / "f.h5")

    def no_ray(address=None):
        raise AssertionError("Ray must not start when the cache holds every image")

    monkeypatch.setattr(ray_extract, "ray_session", no_ray)
    summary = run("ray", paths, tmp_path / "f.h5")
    assert summary.done == 0 and summary.skipped == 3


def test_cli_rejects_bad_engine_options(tmp_path, tiny_encoder, capsys):
    make_images(tmp_path / "imgs", 2)
    base = ["extract", str(tmp_path / "imgs"), "--encoder", "tiny", "--out", str(tmp_path / "f.h5"),
            "--engine", "ray"]  # fmt: skip
    assert cli_main(base + ["--actors", "0"]) == 2
    assert "--actors must be at least 1, not 0." in capsys.readouterr().err
    assert cli_main(base + ["--gpus-per-actor", "-1"]) == 2
    assert "--gpus-per-actor must be 0 or more" in capsys.readouterr().err
    assert not (tmp_path / "f.h5").exists()


def test_extract_bit_identical_with_bad_images(tmp_path, ray_cluster):
    paths = make_images(tmp_path / "imgs", 14) + bad_images(tmp_path / "imgs")
    local = run("local", paths, tmp_path / "local.h5")
    remote = run("ray", paths, tmp_path / "ray.h5")
    assert remote.done == local.done == 14 and remote.failed == local.failed
    assert set(remote.failed) == {"empty.jpg", "truncated.png", "text.jpg"}
    assert_same_cache(tmp_path / "local.h5", tmp_path / "ray.h5")


# --------------------------------------------------------------------------- killed driver

KILLABLE = """
import sys, time
import ray.cloudpickle
import test_features
from test_features import register_tiny
from captioner.features.cache_writer import FeatureWriter

ray.cloudpickle.register_pickle_by_value(test_features)  # workers of a joined cluster lack tests/
register_tiny()
delay = float(sys.argv[1])
original = FeatureWriter._set_status

def slow(self, rows, value):  # widen the window between a batch's rows and its status
    if rows:
        time.sleep(delay)
    original(self, rows, value)

FeatureWriter._set_status = slow
from captioner.cli import main
sys.exit(main(sys.argv[2:]))
"""


def ray_processes(temp: Path) -> list[int]:
    """Ids of the processes of the Ray instance whose temporary folder is ``temp`` (those
    naming it on their command line, and all their descendants)."""
    parents: dict[int, int] = {}
    roots = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents[int(proc.name)] = ppid
        if str(temp) in cmdline and int(proc.name) != os.getpid():
            roots.append(int(proc.name))
    found, frontier = set(roots), list(roots)
    while frontier:
        pid = frontier.pop()
        children = [c for c, p in parents.items() if p == pid and c not in found]
        found.update(children)
        frontier.extend(children)
    return sorted(found)


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def ray_temp():
    """A fresh Ray temporary folder for a CLI subprocess; any process of it left is killed."""
    import shutil
    import tempfile

    temps: list[Path] = []

    def make() -> Path:
        temps.append(Path(tempfile.mkdtemp(prefix="rk")))
        return temps[-1]

    yield make
    for temp in temps:
        kill_all(ray_processes(temp))
        shutil.rmtree(temp, ignore_errors=True)


def cli_ray(delay: float, images: Path, out: Path, temp: Path) -> subprocess.Popen:
    argv = ["extract", str(images), "--encoder", "tiny", "--out", str(out), "--batch-size", "4",
            "--engine", "ray"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]),
           "RAY_TMPDIR": str(temp)}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-c", KILLABLE, str(delay), *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def done_count(path: Path) -> int:
    if not path.exists():
        return 0
    with FeatureReader(path) as reader:
        return reader.counts()["done"]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_killed_driver_then_rerun_is_bit_identical(tmp_path, ray_cluster, ray_temp, tiny_encoder):
    images = tmp_path / "imgs"
    make_images(images, 36, seed=5)
    bad_images(images)
    out = tmp_path / "killed.h5"
    first = ray_temp()
    proc = cli_ray(0.3, images, out, first)
    deadline = time.monotonic() + 300
    while done_count(out) < 8:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the Ray extraction never got going"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    left = ray_processes(first)  # a killed driver leaves the local Ray it started behind
    print(f"processes of the killed driver's Ray still running: {len(left)}")
    kill_all(left)
    with FeatureReader(out) as reader:
        done = reader.counts()["done"]
        pending = {n for n in reader.names if reader.status_of(n) == "pending"}
        assert 8 <= done < 36 and pending
    bad = {"empty.jpg", "truncated.png", "text.jpg"}

    second = ray_temp()
    rerun = cli_ray(0, images, out, second)
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert stdout.startswith(
        f"extracted {len(pending - bad)}, skipped {done} (already in the cache), failed 3"
    )  # only the rows the killed run had not committed were done again
    assert ray_processes(second) == []  # a finished command leaves no Ray process...
    assert list(second.iterdir()) == []  # ...and no temporary folder
    local = ["extract", str(images), "--encoder", "tiny", "--out", str(tmp_path / "local.h5"),
             "--batch-size", "4"]  # fmt: skip
    assert cli_main(local) == 0
    assert_same_cache(out, tmp_path / "local.h5")


# --------------------------------------------------------------------------- caption


def records(path: Path) -> dict[str, dict]:
    lines = path.read_text().splitlines()
    return {r["image"]: r for r in map(json.loads, lines) if "made_with" not in r}


@needs_mobilenet
def test_caption_ray_completes_a_torn_file_with_the_local_captions(tmp_path, ray_cluster, capsys):
    """The bundled model (MobileNetV2 0.5 + attention) on 8 images and 2 bad files."""
    folder = tmp_path / "imgs"
    make_images(folder, 8, seed=4, size=(60, 50))
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image")
    base = ["caption", str(folder), "--batch-size", "4", "--beam-size", "2"]
    assert cli_main(base + ["--out", str(tmp_path / "local.jsonl")]) == 1  # 2 failed
    assert capsys.readouterr().out.startswith(
        "captioned 8, skipped 0 (already in local.jsonl), failed 2"
    )
    local = records(tmp_path / "local.jsonl")
    assert local[str(folder / "empty.jpg")]["error"] == "empty file"

    lines = (tmp_path / "local.jsonl").read_text().splitlines(keepends=True)
    partial_file = tmp_path / "ray.jsonl"
    partial_file.write_text("".join(lines[:3]) + lines[3][:25])  # a run killed mid-line
    argv = base + ["--out", str(partial_file), "--engine", "ray", "--actors", "1"]
    assert cli_main(argv) == 1
    assert capsys.readouterr().out.startswith("captioned ")
    text = partial_file.read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 11  # made_with line + 10 images
    remote = records(partial_file)
    assert remote.keys() == local.keys()
    for image, want in local.items():
        got = remote[image]
        assert got["caption"] == want["caption"] and got.get("error") == want.get("error"), image
        assert [c["caption"] for c in got.get("captions", [])] == [
            c["caption"] for c in want.get("captions", [])
        ]
        if want["score"] is not None:
            assert got["score"] == pytest.approx(want["score"], abs=1e-4)
    assert cli_main(argv) == 0  # nothing left to do: Ray is not even needed
    assert capsys.readouterr().out.startswith("captioned 0, skipped 10")


def mobilenet_run(folder: Path, seed: int) -> Path:
    """A toy merge decoder (random weights) over MobileNetV2 0.5 pooled features: runs of
    different seeds share the vocabulary and the encoder, so they form an ensemble."""
    from runfolder import make_run

    make_run(folder, "merge", (1280,), seed=seed)
    config = json.loads((folder / "config.json").read_text())
    config["encoder"] = {"name": "mobilenet_v2_0.5", "layer": "pool", "weights": "imagenet",
                         "input_size": [224, 224], "feature_shape": [1280]}
    config["decoding"] = {"beam_size": 2, "block_ngram": 1}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@needs_mobilenet
def test_caption_out_and_ray_caption_with_every_model(tmp_path, ray_cluster, capsys):
    """`--model A B --out` and `--engine ray` write the captions `--model A B --json` prints
    (both folders, the first's stored decoding), not those of A alone."""
    a, b = mobilenet_run(tmp_path / "a", 1), mobilenet_run(tmp_path / "b", 2)
    folder = tmp_path / "imgs"
    make_images(folder, 4, seed=5, size=(60, 50))
    base = ["caption", str(folder), "--model", str(a), str(b), "--batch-size", "2"]
    assert cli_main(base + ["--json"]) == 0
    want = {r["image"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert cli_main(["caption", str(folder), "--model", str(a), "--json"]) == 0
    alone = {r["image"]: r["caption"] for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert alone != {k: r["caption"] for k, r in want.items()}  # B changes some caption
    for name, extra in (("local", []), ("ray", ["--engine", "ray", "--actors", "1"])):
        out = tmp_path / f"{name}.jsonl"
        assert cli_main(base + ["--out", str(out), *extra]) == 0, name
        assert capsys.readouterr().out.startswith("captioned 4, skipped 0")
        got = records(out)
        assert {k: r["caption"] for k, r in got.items()} == {k: r["caption"] for k, r in want.items()}
        for image, record in got.items():
            assert record["score"] == pytest.approx(want[image]["score"], abs=1e-4)
        made = json.loads(out.read_text().splitlines()[0])["made_with"]
        assert made["model"] == [str(a.resolve()), str(b.resolve())]
        assert made["decoding"]["beam_size"] == 2 and made["decoding"]["block_ngram"] == 1


def test_caption_ray_needs_out(capsys):
    assert cli_main(["caption", "x.jpg", "--engine", "ray"]) == 2
    assert (
        "--engine ray writes its captions to a file: add --out FILE.jsonl"
        in capsys.readouterr().err
    )


@needs_mobilenet
def test_bench_ray_smoke(tmp_path, ray_cluster, capsys):
    """benchmarks/bench_ray.py end to end on 8 images: a RESULT line, identical caches."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_ray

    make_images(tmp_path / "imgs", 8, seed=2, size=(60, 50))
    assert bench_ray.main(["--images-dir", str(tmp_path / "imgs"), "--n", "8",
                           "--batch-size", "4"]) == 0  # fmt: skip
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last[len("RESULT ") :])
    assert result["identical"] is True and result["n"] == 8
    assert result["ray"]["startup_s"] > 0 and result["local"]["steady_img_s"] > 0


def test_cli_joins_a_running_cluster_and_leaves_it_running(tmp_path, ray_cluster, ray_temp,
                                                           tiny_encoder):  # fmt: skip
    """--ray-address ADDRESS: the command joins the (fixture's) cluster instead of starting
    one, and its exit does not stop that cluster."""
    images = tmp_path / "imgs"
    make_images(images, 10, seed=6)
    address = ray_cluster.get_runtime_context().gcs_address
    argv = ["extract", str(images), "--encoder", "tiny", "--out", str(tmp_path / "joined.h5"),
            "--batch-size", "4", "--engine", "ray", "--ray-address", address]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
    proc = subprocess.run([sys.executable, "-c", KILLABLE, "0", *argv], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("extracted 10, skipped 0 (already in the cache), failed 0")
    assert ray_cluster.cluster_resources().get("CPU") == 2  # still up
    local = ["extract", str(images), "--encoder", "tiny", "--out", str(tmp_path / "local.h5"),
             "--batch-size", "4"]  # fmt: skip
    assert cli_main(local) == 0
    assert_same_cache(tmp_path / "joined.h5", tmp_path / "local.h5")


def test_unreachable_cluster_is_a_quick_one_line_error(tmp_path, tiny_encoder, capsys):
    """Ray retries a dead address for minutes; the command says so at once (exit 2)."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    make_images(tmp_path / "imgs", 2)
    argv = ["extract", str(tmp_path / "imgs"), "--encoder", "tiny", "--out", str(tmp_path / "f.h5"),
            "--engine", "ray", "--ray-address", f"127.0.0.1:{port}"]  # fmt: skip
    start = time.monotonic()
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in err and "ray start --head" in err
    assert time.monotonic() - start < 30 and not (tmp_path / "f.h5").exists()

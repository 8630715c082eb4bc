"""Shared test set-up: locate ../shared, seed a Keras cache from its weights, tiny helpers."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CAPTIONER_SHARED", ROOT.parent / "shared"))
FLICKR = SHARED / "flickr8k"
FLICKR_IMAGES = FLICKR / "Flicker8k_Dataset"
FLICKR_TEXT = FLICKR / "Flickr8k_text"
MOBILENET_FILE = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5"


def _seed_keras_home() -> None:
    """Point KERAS_HOME at a cache holding ../shared/weights (before Keras is imported)."""
    src = SHARED / "weights" / MOBILENET_FILE
    if os.environ.get("KERAS_HOME") or not src.is_file():
        return
    home = Path(tempfile.mkdtemp(prefix="captioner-keras-home-"))
    (home / "models").mkdir()
    shutil.copy(src, home / "models" / MOBILENET_FILE)
    os.environ["KERAS_HOME"] = str(home)


_seed_keras_home()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

needs_flickr = pytest.mark.skipif(
    not (FLICKR_IMAGES.is_dir() and FLICKR_TEXT.is_dir()),
    reason="../shared/flickr8k is not present",
)
def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


HAVE_PYCOCO = _importable("pycocoevalcap.bleu.bleu")  # an optional cross-check (dev extra)
needs_pycoco = pytest.mark.skipif(not HAVE_PYCOCO, reason="pycocoevalcap is not installed")
needs_mobilenet = pytest.mark.skipif(
    not (Path(os.environ.get("KERAS_HOME", "~/.keras")).expanduser() / "models" / MOBILENET_FILE).is_file(),
    reason="MobileNetV2 alpha=0.5 ImageNet weights are not in the Keras cache (../shared/weights)",
)


# The fast tier, for the edit-test loop, is `python -m pytest -m "not slow"`: every test marked
# with one of SLOW_MARKS also gets `slow`. Whole files are marked in FILE_MARKS (their files stay
# as they are), tests that use a fixture of FIXTURE_MARKS get its mark, single tests carry theirs.
SLOW_MARKS = ("subprocess", "ray", "browser", "training", "hypothesis", "benchmark", "meteor")
FILE_MARKS = {
    "test_bench_serve.py": ("benchmark",),
    "test_benchmarks.py": ("benchmark",),
    "test_distributed.py": ("subprocess", "training"),
    "test_faults.py": ("subprocess", "training"),
    "test_fit.py": ("subprocess", "training"),
    "test_properties.py": ("hypothesis",),
    "test_ray.py": ("ray",),
    "test_scst.py": ("training",),
    "test_serve_browser.py": ("browser",),
    "test_serve_load.py": ("subprocess",),
    "test_training.py": ("training",),
}
FIXTURE_MARKS = {  # fixtures that train a toy run, or start Ray
    "merge_toy": "training",
    "attention_toy": "training",
    "toy_run": "training",
    "ray_cluster": "ray",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        marks = {*FILE_MARKS.get(item.path.name, ())}
        marks |= {FIXTURE_MARKS[name] for name in item.fixturenames if name in FIXTURE_MARKS}
        for name in sorted(marks):
            item.add_marker(name)
        if any(item.get_closest_marker(name) for name in SLOW_MARKS):
            item.add_marker("slow")


@pytest.fixture(autouse=True)
def no_meteor_jar(request, monkeypatch):
    """METEOR's jar takes 6-14 s to start: only tests marked ``meteor`` start it; elsewhere there
    is no Java, and evaluations report METEOR n/a (METEOR 1.5 is tested in test_meteor.py)."""
    if request.node.get_closest_marker("meteor") is None:
        monkeypatch.setattr("captioner.evaluation.meteor.find_java", lambda: None)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray (2 CPUs) for every Ray test of the session, shut down afterwards.

    Its workers see the tests folder (for the tiny encoder); its temporary folder is a fresh
    one under the system's (short: Ray's socket paths have a length limit) and is removed."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    temp = Path(tempfile.mkdtemp(prefix="rt"))
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning",
             _temp_dir=str(temp), runtime_env={"env_vars": {"PYTHONPATH": path}})
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def merge_toy(tmp_path_factory):
    """A merge run trained once per session on toy_dataset's 8 images (12 epochs, seed 0), with
    its caption file and caches (helpers.train_toy's namespace). Shared by several modules:
    read it only; copy the run folder (shutil.copytree) before changing anything in it."""
    from helpers import train_toy

    return train_toy(tmp_path_factory.mktemp("merge_toy"))


@pytest.fixture(scope="session")
def tiny_serve_run(tmp_path_factory):
    """serve_fixtures.tiny_attention_run once per session for the service's tests: (run folder,
    feature table, caption of photo k). Read it only; copy the folder before changing it."""
    from serve_fixtures import tiny_attention_run

    return tiny_attention_run(tmp_path_factory.mktemp("tiny_serve"))


@pytest.fixture(scope="session")
def untrained_run(tmp_path_factory):
    """runfolder.make_run's untrained merge run (16 features), written once per session. Read it
    only; the tests that damage a run folder copy it first (shutil.copytree)."""
    from runfolder import make_run

    return make_run(tmp_path_factory.mktemp("untrained") / "run")

"""Smoke runs of the training and decoding benchmarks: end to end, RESULT line, no timings."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
from conftest import FLICKR_TEXT, ROOT, needs_mobilenet

sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_bucket  # noqa: E402
import bench_decode  # noqa: E402
import bench_first_caption  # noqa: E402
import bench_train  # noqa: E402

TRAIN_KEYS = {"ratio", "ours_captions_s", "classic_captions_s", "ours_peak_rss_mb",
              "classic_peak_rss_mb", "ours_epoch_s_full_split", "classic_epoch_s_full_split"}  # fmt: skip
DECODE_KEYS = {"ratio", "classic_ms_per_caption", "ours_greedy_ms_per_caption",
               "ours_greedy_batched_ms_per_caption", "ours_beam3_ms_per_caption", "agree"}  # fmt: skip

have_captions = pytest.mark.skipif(
    not (FLICKR_TEXT / "Flickr8k.token.txt").is_file(), reason="../shared/flickr8k is not present"
)
DATA = [
    pytest.param([], marks=[pytest.mark.shared, have_captions], id="flickr8k-captions"),
    pytest.param(["--captions", "no-such-captions.txt"], id="toy-captions"),
]


def _result(out: str) -> dict:
    lines = out.strip().splitlines()
    assert lines and lines[-1].startswith("RESULT "), out[-2000:]
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.mark.parametrize("data", DATA)
def test_bench_train_smoke(capsys, tmp_path, monkeypatch, data):
    monkeypatch.chdir(tmp_path)
    assert bench_train.main(["--smoke", *data]) == 0
    result = _result(capsys.readouterr().out)
    assert TRAIN_KEYS <= set(result)
    smoke = bench_train.SMOKE
    assert result["classic_captions"] == 5 * smoke["images"]  # one pass over the photos
    assert result["ours_captions"] == 5 * smoke["images"] * smoke["rounds"] * smoke["ours_epochs"]
    assert len(result["ratio_per_round"]) == smoke["rounds"]
    assert result["ours_peak_rss_mb"] > 0 and result["classic_peak_rss_mb"] > 0


@pytest.mark.parametrize("data", DATA)
def test_bench_decode_smoke(capsys, tmp_path, monkeypatch, data):
    monkeypatch.chdir(tmp_path)
    assert bench_decode.main(["--smoke", *data]) == 0
    result = _result(capsys.readouterr().out)
    assert DECODE_KEYS <= set(result)
    # same model, same greedy rule: the classic loop and ours produce the same captions
    assert result["agree"] == result["n_classic"] == bench_decode.SMOKE["n"]
    assert result["agree_batched"] == result["n_ours"]


@pytest.mark.shared
@needs_mobilenet
def test_bench_first_caption_smoke(capsys):
    assert bench_first_caption.main(["--baseline", str(ROOT), "--runs", "1", "--no-warmup"]) == 0
    result = _result(capsys.readouterr().out)
    assert result["runs"] == 1 and result["ours_peak_mib"] > 100 and result["ratio_wall_s"] > 0


@pytest.mark.shared
@have_captions
def test_bench_bucket_smoke(capsys):
    bench_bucket.main(["--images", "12", "--rounds", "1", "--feature-shape", "2,2,8",
                       "--batch-size", "8"])  # fmt: skip
    result = _result(capsys.readouterr().out)
    assert result["captions"] == 60 and result["speedup"] > 0 and result["device"]
    # by hand: 60 captions in 8 batches (7 of 8, then 4); padded, each has max_length - 1 = 21
    # steps; bucketed, captions sorted by length (<start> + at most 20 words + <end>) in runs of
    # 8, each batch trimmed to its longest caption less one, rounded up to 4 (at most 21)
    captions, _ = bench_bucket.load(SimpleNamespace(images=12))
    lengths = sorted(min(len(c.split()), 20) + 2 for cs in captions.values() for c in cs)
    runs = [lengths[i : i + 8] for i in range(0, 60, 8)]
    assert result["padded"]["decoder_steps"] == 8 * 21
    steps = sum(min(-(-(max(r) - 1) // 4) * 4, 21) for r in runs)
    assert result["bucketed"]["decoder_steps"] == steps < 8 * 21


def test_bench_consensus_smoke(capsys, tmp_path, untrained_run):
    """The reranking cost benchmark on a tiny run given an index and a reranking decoding."""
    import dataclasses
    import shutil

    import bench_consensus
    import numpy as np
    from helpers import write_cache

    from captioner.features.cache import open_features
    from captioner.formats.run_folder import RunConfig
    from captioner.train.neighbour_index import attach

    run = tmp_path / "run"
    shutil.copytree(untrained_run, run)
    rng = np.random.default_rng(0)
    feats = {f"p{i}.jpg": rng.normal(size=16).astype("float32") for i in range(6)}
    cache = write_cache(tmp_path / "feats.h5", feats)
    with open_features(cache) as reader:
        attach(run, reader, {name: ["a dog runs", "the red ball"] for name in feats})
    config = RunConfig.load(run)
    dataclasses.replace(config, decoding=config.decoding.replace(beam_size=4, consensus=3)).save(run)
    result = bench_consensus.main(["--features", str(cache), "--model", str(run), "--runtime",
                                   "keras", "--n", "4", "--batch-size", "2", "--repeats", "1"])
    assert _result(capsys.readouterr().out) == result
    assert result["n"] == 4 and "consensus of 3 neighbours" in result["decoding"]
    assert {"stored", "same beam, no reranking", "beam 3, no reranking", "reranking_ms"} <= set(result)

"""Consensus reranking: the neighbour index (build, file, checks), the CIDEr-D agreement it
gives a caption, and the beam's captions reordered by it in a run folder and on the CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from captioner.errors import CaptionerError
from captioner.formats.decoding_config import DecodingConfig
from captioner.inference.consensus import (
    NEIGHBOURS_FILE,
    NeighbourError,
    Neighbours,
    pooled,
    rerank,
)
from captioner.storage.files import sha256sum
from captioner.train.neighbour_index import attach

CAPTIONS = [["a dog runs on the grass", "a brown dog runs"],
            ["a cat sits on the sofa", "the cat sits"],
            ["a man rides a red bike", "a man on a bike"]]


def _index(dims: int = 3) -> tuple[Neighbours, np.ndarray]:
    """An index of three images whose features point along three axes (+ noise)."""
    rng = np.random.default_rng(0)
    feats = np.eye(3, 8, dtype="float32") * 3 + rng.normal(0, 0.05, (3, 8)).astype("float32")
    return Neighbours.build(feats, CAPTIONS, dims=dims), feats


def test_pooled_averages_the_map_and_is_unit_length():
    maps = np.ones((2, 3, 3, 4), "float32") * np.arange(1, 5)
    out = pooled(maps)
    assert out.shape == (2, 4)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(out[0], np.arange(1, 5) / np.linalg.norm(np.arange(1, 5)), rtol=1e-6)


def test_nearest_finds_the_image_whose_features_point_the_same_way():
    index, feats = _index()
    rows, sims = index.nearest(feats[[2, 0]] + 0.01, k=2)
    assert rows[:, 0].tolist() == [2, 0]
    assert (sims[:, 0] > 0.99).all() and (sims[:, 0] > sims[:, 1]).all()
    assert index.nearest(feats[:1], k=10)[0].shape == (1, 3)  # k above the index: all of it


def test_a_caption_the_neighbours_agree_with_has_the_larger_utility():
    index, feats = _index()
    rows, sims = index.nearest(feats[:1], k=2)  # the dog image first
    dog, cat, nothing = index.utility(["a dog runs on the grass", "a cat sits on the sofa",
                                       "zebra"], rows[0], sims[0])
    assert dog > 1.0 > cat > nothing == 0.0


def test_rerank_orders_by_agreement_plus_weighted_search_score():
    index, feats = _index()
    texts = [["a cat sits on the sofa", "a dog runs on the grass"]]
    assert rerank(index, feats[:1], texts, [[-1.0, -1.5]], k=1, weight=0.0) == [[1, 0]]
    # a weight large enough hands the choice back to the search score
    assert rerank(index, feats[:1], texts, [[-1.0, -1.5]], k=1, weight=100.0) == [[0, 1]]
    assert rerank(index, feats[:1], [["one"]], [[-1.0]], k=1, weight=0.0) == [[0]]


def test_the_index_file_round_trips_without_pickle(tmp_path):
    index, feats = _index()
    index.save(tmp_path / NEIGHBOURS_FILE)
    loaded = Neighbours.load(tmp_path / NEIGHBOURS_FILE)
    assert loaded.captions == CAPTIONS
    np.testing.assert_allclose(loaded.vectors, index.vectors, atol=0.02)  # int8 codes
    with np.load(tmp_path / NEIGHBOURS_FILE, allow_pickle=False) as data:
        assert data["codes"].dtype == np.int8 and data["captions"].dtype == np.uint8
    assert loaded.nearest(feats, 1)[0][:, 0].tolist() == [0, 1, 2]
    # the stored document frequencies give the very scores counted from the captions
    rows, sims = np.array([0, 1, 2]), np.array([0.9, 0.5, 0.1])
    hyps = ["a dog runs on the grass", "a cat sits", "a man"]
    np.testing.assert_array_equal(loaded.utility(hyps, rows, sims), index.utility(hyps, rows, sims))
    with np.load(tmp_path / NEIGHBOURS_FILE, allow_pickle=False) as data:
        assert (data["ngram_counts"] > 1).all() and len(data["ngram_counts"]) == 4  # a, on, the, on the


def _rewrite(path, **changes):
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    arrays.update(changes)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)


@pytest.mark.parametrize("damage, says", [
    (lambda p: p.write_bytes(b"not a zip file"), "cannot read the neighbour index"),
    (lambda p: _rewrite(p, codes=None), "missing ['codes']"),
    (lambda p: _rewrite(p, format=np.array("something else")), "not a neighbour index"),
    (lambda p: _rewrite(p, version=np.array(99)), "newer than this captioner reads"),
    (lambda p: _rewrite(p, caption_image=np.array([0, 7], np.int32)), "do not fit together"),
    (lambda p: _rewrite(p, codes=np.zeros((3, 2), np.int8)), "do not fit together"),
    (lambda p: _rewrite(p, captions=np.frombuffer(b"\xff\xfe", np.uint8)), "do not fit together"),
    (lambda p: _rewrite(p, ngram_counts=np.ones(4, np.int32)), "do not fit together"),
    (lambda p: _rewrite(p, ngrams=np.frombuffer(b"a", np.uint8)), "do not fit together"),
    (lambda p: _rewrite(p, projection=np.full((8, 3), np.nan, np.float16)), "do not fit together"),
    (lambda p: np.savez(p, **{k: np.array([{"x": 1}], dtype=object) for k in
                              ("format", "version", "projection", "codes", "scales",
                               "captions", "caption_image", "ngrams", "ngram_counts")}),
     "cannot read the neighbour index"),
])
def test_a_bad_index_file_is_one_line_naming_it(tmp_path, damage, says):
    path = tmp_path / NEIGHBOURS_FILE
    _index()[0].save(path)
    damage(path)
    with pytest.raises(NeighbourError) as err:
        Neighbours.load(path)
    assert str(path) in str(err.value) and says in str(err.value)
    assert "\n" not in str(err.value)


def test_build_needs_one_caption_list_per_row():
    with pytest.raises(NeighbourError, match="one caption list per feature row"):
        Neighbours.build(np.ones((2, 4), "float32"), [["a"]])


def test_features_of_another_width_are_refused():
    index, _ = _index()
    with pytest.raises(NeighbourError, match="takes 8 channels"):
        index.nearest(np.ones((1, 5), "float32"), 1)


def test_consensus_is_a_checked_decoding_setting():
    assert DecodingConfig().consensus == 0 and DecodingConfig().consensus_weight == 1.0
    with pytest.raises(CaptionerError, match="consensus"):
        DecodingConfig(consensus=-1)
    with pytest.raises(CaptionerError, match="consensus"):
        DecodingConfig(consensus=201)
    with pytest.raises(CaptionerError, match="consensus_weight"):
        DecodingConfig(consensus_weight=float("nan"))
    assert DecodingConfig(beam_size=10, consensus=40).label == (
        "beam 10, consensus of 40 neighbours")
    assert "consensus" not in DecodingConfig(beam_size=1, consensus=40).label  # greedy: no rerank
    assert DecodingConfig.from_dict({"beam_size": 3}).consensus == 0  # configs from before


# ------------------------------------------------------------------ in a run folder


def _indexed_run(untrained_run, tmp_path, captions):
    """A copy of the untrained run whose index holds one image with ``captions``."""
    from helpers import write_cache

    from captioner.features.cache import open_features

    run = tmp_path / "run"
    shutil.copytree(untrained_run, run)
    vec = np.ones(16, "float32")
    cache = write_cache(tmp_path / "train.h5", {"only.jpg": vec})
    with open_features(cache) as reader:
        attach(run, reader, {"only.jpg": captions})
    return run, vec[None]


def test_the_run_folders_index_picks_the_caption_its_neighbours_agree_with(untrained_run, tmp_path):
    from captioner.inference.loader import load_captioner

    plain = load_captioner(untrained_run, runtime="keras")
    feats = np.ones((1, 16), "float32")
    beams = [c.text for c in plain.caption(feats, DecodingConfig(beam_size=4, n_best=4))[0].captions]
    target = beams[-1]  # the search's last choice
    run, feats = _indexed_run(untrained_run, tmp_path, [target, target])
    config = json.loads((run / "config.json").read_text())
    assert config["grounding"]["neighbours"] == NEIGHBOURS_FILE
    assert config["files"][NEIGHBOURS_FILE]["sha256"] == sha256sum(run / NEIGHBOURS_FILE)
    cap = load_captioner(run, runtime="keras")
    ranked = cap.caption(feats, DecodingConfig(beam_size=4, n_best=2, consensus=1,
                                               consensus_weight=0.0))[0].captions
    assert ranked[0].text == target and len(ranked) == 2
    off = cap.caption(feats, DecodingConfig(beam_size=4, n_best=4))[0].captions
    assert [c.text for c in off] == beams  # consensus 0: the search's order
    # an ensemble reranks with any member's index
    both = load_captioner([untrained_run, run], runtime="keras")
    assert both.neighbours is not None
    # a run without an index ignores the setting
    assert plain.caption(feats, DecodingConfig(beam_size=4, consensus=5))[0].text == beams[0]


def test_a_damaged_index_in_a_run_folder_is_one_line(untrained_run, tmp_path):
    from captioner.inference.loader import load_captioner

    run, _ = _indexed_run(untrained_run, tmp_path, ["a dog"])
    config = json.loads((run / "config.json").read_text())
    del config["files"][NEIGHBOURS_FILE]  # past the sha256 check: the reader's own checks
    (run / "config.json").write_text(json.dumps(config))
    (run / NEIGHBOURS_FILE).write_bytes(b"garbage")
    with pytest.raises(CaptionerError, match=NEIGHBOURS_FILE) as err:
        load_captioner(run, runtime="keras")
    assert "\n" not in str(err.value)


def test_config_must_name_the_index_as_a_plain_file(untrained_run, tmp_path):
    from captioner.formats.run_folder import RunConfig

    run, _ = _indexed_run(untrained_run, tmp_path, ["a dog"])
    config = json.loads((run / "config.json").read_text())
    config["grounding"]["neighbours"] = "../elsewhere.npz"
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(CaptionerError, match="grounding.neighbours"):
        RunConfig.load(run)


def test_cli_builds_the_index_of_a_run(merge_toy, tmp_path, capsys):
    from captioner.cli import main
    from captioner.inference.loader import load_captioner

    run = tmp_path / "run"
    shutil.copytree(merge_toy.run, run)
    (run / NEIGHBOURS_FILE).unlink()
    assert main(["neighbours", str(run), "--captions", str(merge_toy.caps),
                 "--features", str(merge_toy.features)]) == 0
    assert "8 training images" in capsys.readouterr().out
    index = load_captioner(run, runtime="keras").neighbours
    assert len(index.captions) == 8 and all(len(c) == 2 for c in index.captions)
    assert main(["neighbours", str(tmp_path), "--captions", str(merge_toy.caps),
                 "--features", str(merge_toy.features)]) == 2
    assert "is not a run folder" in capsys.readouterr().err


def test_training_gives_the_run_its_index(merge_toy):
    config = json.loads((merge_toy.run / "config.json").read_text())
    assert config["grounding"].get("neighbours") == NEIGHBOURS_FILE
    assert len(Neighbours.load(merge_toy.run / NEIGHBOURS_FILE).captions) == 8


def test_cli_consensus_options_are_checked_before_the_model_loads(capsys):
    from conftest import ROOT

    from captioner.cli import main

    assert main(["caption", str(ROOT / "data" / "example.jpg"), "--consensus", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--consensus must be from 0 to 200" in err and "\n" not in err
    assert main(["caption", str(ROOT / "data" / "example.jpg"), "--consensus-weight", "nan"]) == 2
    assert "--consensus-weight" in capsys.readouterr().err


WORDS = ["a", "dog", "runs", "on", "the", "grass", "man", "red", "ball", "cat"]
CAPTION = st.lists(st.sampled_from(WORDS), min_size=0, max_size=12).map(" ".join)


@settings(max_examples=60, deadline=None)
@given(st.lists(CAPTION, min_size=1, max_size=6), st.lists(CAPTION, min_size=1, max_size=8))
def test_cider_matrix_is_cider_pair_of_every_pair(hyps, refs):
    from collections import Counter

    from captioner.text.cider import TfIdf, cider_matrix, cider_pair, ngrams

    df = Counter()
    for caption in hyps + refs:
        df.update(set(ngrams(caption.split())))
    h = [TfIdf(c.split(), df, 3.0) for c in hyps]
    r = [TfIdf(c.split(), df, 3.0) for c in refs]
    expected = np.array([[cider_pair(a, b) for b in r] for a in h])
    np.testing.assert_allclose(cider_matrix(h, r), expected, rtol=1e-9, atol=1e-12)

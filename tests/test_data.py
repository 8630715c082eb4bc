"""CaptionDataset batches, masks, shuffling and memory; the benchmarks' ProgressiveLoader baseline."""

from __future__ import annotations

import itertools
import math
import sys
import tracemalloc
from collections.abc import Sequence

import keras
import numpy as np
import pytest
from conftest import ROOT

from captioner.errors import CaptionerError
from captioner.text.tokenizer import END, START, UNK, Tokenizer
from captioner.train.batches import CaptionDataset, FeatureSource, flat_feature_shape

sys.path.insert(0, str(ROOT / "benchmarks"))
from progressive import ProgressiveLoader  # noqa: E402  (the benchmark baseline)


class FakeSource:
    """In-memory feature source; image k's features are ``k * 1000 + arange``."""

    def __init__(self, names: Sequence[str], shape: tuple[int, ...], prefers_sorted=False):
        self.feature_shape = shape
        self.prefers_sorted = prefers_sorted
        size = math.prod(shape)
        self.table = {
            name: (k * 1000 + np.arange(size, dtype=np.float32)).reshape(shape)
            for k, name in enumerate(names)
        }
        self.calls: list[list[str]] = []

    def read(self, names: Sequence[str]) -> np.ndarray:
        self.calls.append(list(names))
        return np.stack([self.table[name] for name in names])

    def __contains__(self, name: str) -> bool:
        return name in self.table


class NoContainsSource:
    feature_shape = (4,)

    def read(self, names: Sequence[str]) -> np.ndarray:
        raise KeyError(names[0])


def make_captions(n_images: int, per_image: int = 5) -> dict[str, list[str]]:
    """Image k's captions start with the word ``imgK``; lengths vary from 1 to 5 words."""
    words = ["dog", "runs", "on", "the", "grass"]
    return {
        f"{k:05d}.jpg": [" ".join([f"img{k}", *words[: (k + c) % 5]]) for c in range(per_image)]
        for k in range(n_images)
    }


def make(n_images=10, shape=(8,), per_image=5, **kwargs):
    captions = make_captions(n_images, per_image)
    source = FakeSource(list(captions), shape, kwargs.pop("prefers_sorted", False))
    tok = Tokenizer.build([c for caps in captions.values() for c in caps])
    return CaptionDataset(source, captions, tok, **kwargs), source, captions, tok


def all_batches(ds: CaptionDataset) -> list:
    return [ds[i] for i in range(len(ds))]


def batch_order(ds: CaptionDataset) -> list[str]:
    """Decoded captions of one epoch, in batch order."""
    return [ds.tokenizer.decode(row) for (_, t_in), _, _ in all_batches(ds) for row in t_in]


# ----------------------------------------------------------------------------- batches


def check_batch(ds, batch, feature_shape):
    (feats, t_in), t_out, weights = batch
    n = feats.shape[0]
    T = ds.tokenizer.max_length
    assert feats.dtype == np.float32 and feats.shape == (n, *feature_shape)
    assert t_in.dtype == np.int32 and t_in.shape == (n, T - 1)
    assert t_out.dtype == np.int32 and t_out.shape == (n, T - 1)
    assert weights.dtype == np.float32 and weights.shape == (n, T - 1)
    np.testing.assert_array_equal(weights, (t_out != 0).astype(np.float32))
    np.testing.assert_array_equal(t_in[:, 1:], t_out[:, :-1])
    assert (t_in[:, 0] == START).all()
    for row in range(n):
        k = int(ds.tokenizer.decode(t_in[row]).split()[0][3:])  # "imgK ..."
        assert feats[row].reshape(-1)[0] == k * 1000
        caption_len = int((t_out[row] != 0).sum())  # words + <end>
        assert t_out[row, caption_len - 1] == END


def test_vector_feature_batches():
    ds, source, captions, tok = make(n_images=10, shape=(8,), batch_size=16, shuffle=False)
    assert ds.num_samples == 50 and len(ds) == 4
    assert tok.max_length == 7
    batches = all_batches(ds)
    assert [b[0][0].shape[0] for b in batches] == [16, 16, 16, 2]
    for batch in batches:
        check_batch(ds, batch, (8,))
    (feats, t_in), t_out, weights = batches[0]
    # first sample: image 0, caption 0 = "img0" -> <start> img0 <end>
    assert t_in[0].tolist() == [START, tok.index["img0"], END, 0, 0, 0]
    assert t_out[0].tolist() == [tok.index["img0"], END, 0, 0, 0, 0]
    assert weights[0].tolist() == [1, 1, 0, 0, 0, 0]
    np.testing.assert_array_equal(feats[0], source.table["00000.jpg"])
    # padding never weighs: total weight = sum over captions of (words + <end>)
    total = sum(float(b[2].sum()) for b in batches)
    assert total == sum(len(c.split()) + 1 for caps in captions.values() for c in caps)


def test_spatial_7x7_features_are_flattened():
    ds, source, _, _ = make(n_images=6, shape=(7, 7, 3), batch_size=8)
    assert ds.feature_shape == (49, 3)
    for batch in all_batches(ds):
        check_batch(ds, batch, (49, 3))
    (feats, t_in), _, _ = ds[0]
    k = int(ds.tokenizer.decode(t_in[0]).split()[0][3:])
    np.testing.assert_array_equal(feats[0], source.table[f"{k:05d}.jpg"].reshape(49, 3))


def test_sequence_features_pass_through():
    ds, _, _, _ = make(n_images=4, shape=(5, 3), batch_size=7)
    assert ds.feature_shape == (5, 3)
    check_batch(ds, ds[0], (5, 3))


def test_flat_feature_shape():
    assert flat_feature_shape((4096,)) == (4096,)
    assert flat_feature_shape((49, 512)) == (49, 512)
    assert flat_feature_shape((7, 7, 512)) == (49, 512)
    with pytest.raises(CaptionerError, match=r"feature shape \(1, 2, 3, 4\) is not supported"):
        flat_feature_shape((1, 2, 3, 4))


def test_fake_source_fits_the_protocol():
    assert isinstance(FakeSource(["a"], (2,)), FeatureSource)


def test_batch_reads_each_needed_image_once_in_sorted_order():
    ds, source, _, _ = make(n_images=30, batch_size=32, prefers_sorted=True, seed=3)
    for i in range(len(ds)):
        source.calls.clear()
        (feats, t_in), _, _ = ds[i]
        assert len(source.calls) == 1
        (names,) = source.calls
        assert names == sorted(set(names))
        expected = {f"{int(ds.tokenizer.decode(r).split()[0][3:]):05d}.jpg" for r in t_in}
        assert set(names) == expected
        check_batch(ds, ds[i], (8,))


def test_unsorted_source_gets_names_in_dataset_order():
    captions = {"b.jpg": ["img1 dog"], "a.jpg": ["img0 dog"]}
    source = FakeSource(["a.jpg", "b.jpg"], (2,))
    tok = Tokenizer.build(["img0 dog", "img1 dog"])
    ds = CaptionDataset(source, captions, tok, batch_size=2, shuffle=False)
    (feats, _), _, _ = ds[0]
    assert source.calls == [["b.jpg", "a.jpg"]]
    np.testing.assert_array_equal(feats[:, 0], [1000, 0])


def test_in_memory_reads_once_and_gives_the_same_batches():
    lazy, _, _, _ = make(n_images=12, seed=5, batch_size=9)
    ram, source, _, _ = make(n_images=12, seed=5, batch_size=9, in_memory=True)
    calls = len(source.calls)
    assert calls == 1
    for a, b in zip(all_batches(lazy), all_batches(ram), strict=True):
        for x, y in zip((*a[0], a[1], a[2]), (*b[0], b[1], b[2]), strict=True):
            np.testing.assert_array_equal(x, y)
    assert len(source.calls) == calls


def test_missing_features_name_an_image():
    captions = make_captions(3)
    source = FakeSource(list(captions)[:2], (4,))
    tok = Tokenizer.build(["img0"])
    with pytest.raises(
        CaptionerError, match=r"no cached features for 1 of 3 image\(s\), e\.g\. '00002\.jpg'"
    ):
        CaptionDataset(source, captions, tok)
    ds = CaptionDataset(NoContainsSource(), captions, tok)
    with pytest.raises(CaptionerError, match="no cached features for image '0000"):
        ds[0]


def test_constructor_errors_and_pydataset_kwargs():
    captions = make_captions(2)
    tok = Tokenizer.build(["img0"])
    with pytest.raises(CaptionerError, match="no captions to train on"):
        CaptionDataset(FakeSource([], (2,)), {"x.jpg": []}, tok)
    ds = CaptionDataset(
        FakeSource(list(captions), (2,)), captions, tok, workers=2, max_queue_size=3
    )
    assert ds.workers == 2 and ds.max_queue_size == 3
    with pytest.raises(IndexError):
        ds[len(ds)]


# ----------------------------------------------------------------------------- shuffling


def test_shuffling_is_deterministic_per_seed_and_epoch():
    a, _, captions, _ = make(n_images=20, batch_size=8, seed=1)
    b, _, _, _ = make(n_images=20, batch_size=8, seed=1)
    other_seed, _, _, _ = make(n_images=20, batch_size=8, seed=2)
    unshuffled, _, _, _ = make(n_images=20, batch_size=8, shuffle=False)

    epoch0 = batch_order(a)
    assert epoch0 == batch_order(b)
    assert epoch0 != batch_order(other_seed)
    assert batch_order(unshuffled) == [c for caps in captions.values() for c in caps]
    assert sorted(epoch0) == sorted(batch_order(unshuffled))  # a permutation of all samples

    a.on_epoch_end()  # no epoch begun (Keras' reset() before fit): ignored
    assert a.epoch == 0 and batch_order(a) == epoch0
    a.on_epoch_begin()
    a.on_epoch_end()
    assert a.epoch == 1
    epoch1 = batch_order(a)
    assert epoch1 != epoch0 and sorted(epoch1) == sorted(epoch0)

    b.set_epoch(1)
    assert batch_order(b) == epoch1
    b.set_epoch(0)
    assert batch_order(b) == epoch0
    unshuffled.on_epoch_begin()
    unshuffled.on_epoch_end()
    assert unshuffled.epoch == 1 and batch_order(unshuffled) == batch_order(
        make(20, batch_size=8, shuffle=False)[0]
    )


@pytest.mark.training
def test_model_fit_uses_epoch_orders_from_zero_and_resumes():
    import keras

    class Recording(CaptionDataset):
        def __getitem__(self, index):
            self.seen.add(self.epoch)
            return super().__getitem__(index)

    captions = make_captions(6)
    tok = Tokenizer.build([c for caps in captions.values() for c in caps])
    source = FakeSource(list(captions), (4,))

    def model():
        feats = keras.Input((4,))
        tokens = keras.Input((tok.max_length - 1,), dtype="int32")
        x = keras.layers.Embedding(tok.vocab_size, 4)(tokens)
        x = x + keras.layers.Reshape((1, 4))(keras.layers.Dense(4)(feats))
        out = keras.layers.Dense(tok.vocab_size)(x)
        m = keras.Model([feats, tokens], out)
        m.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return m

    ds = Recording(source, captions, tok, batch_size=8, seed=4)
    ds.seen = set()
    model().fit(ds, epochs=2, verbose=0)
    assert ds.epoch == 2 and {0, 1} <= ds.seen

    resumed = Recording(source, captions, tok, batch_size=8, seed=4)
    resumed.seen = set()
    resumed.set_epoch(1)
    model().fit(resumed, epochs=1, verbose=0)
    assert resumed.epoch == 2 and 1 in resumed.seen and 0 not in resumed.seen


# ----------------------------------------------------------------------------- memory


def array_bytes(obj) -> int:
    return sum(v.nbytes for v in vars(obj).values() if isinstance(v, np.ndarray))


def batch_peak(ds: CaptionDataset, index: int) -> int:
    ds[index]  # warm up any lazy state
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        ds[index]
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("n", [1_000, 20_000])
def test_holding_memory_is_token_ids_plus_index_arrays(n):
    ds, _, _, tok = make(n_images=n, per_image=1, shape=(64,), batch_size=32)
    T = tok.max_length
    assert ds.tokens.shape == (n, T) and ds.tokens.dtype == np.int32
    assert array_bytes(ds) == n * T * 4 + n * 4 + n * 4  # tokens + image index + order


def test_batch_memory_does_not_grow_with_dataset_size():
    peaks = []
    for n in (1_000, 20_000):
        ds, _, _, tok = make(n_images=n, per_image=1, shape=(64,), batch_size=32)
        assert tok.max_length == 7
        peaks.append(batch_peak(ds, 5))
    # one batch: 32 x 64 float32 features + token arrays + small index arrays
    assert 32 * 64 * 4 <= peaks[0] < 40_000
    assert abs(peaks[0] - peaks[1]) <= 512, peaks


# ----------------------------------------------------------------------------- baseline


def test_progressive_loader_shapes_and_one_hot():
    captions = {"a.jpg": ["dog runs", "a dog runs on grass"], "b.jpg": ["cat"]}
    tok = Tokenizer.build([c for caps in captions.values() for c in caps])
    assert tok.max_length == 7
    source = FakeSource(["a.jpg", "b.jpg"], (7, 7, 2))
    loader = ProgressiveLoader(source, captions, tok)
    assert loader.steps_per_epoch == 2

    (x1, x2), y = loader.photo_arrays("a.jpg")
    samples = (2 + 1) + (5 + 1)  # one per next word incl. <end>, per caption
    assert x1.shape == (samples, 49, 2) and x1.dtype == np.float32
    assert x2.shape == (samples, 6) and x2.dtype == np.int32
    assert y.shape == (samples, tok.vocab_size) and y.dtype == np.float32
    assert (x1 == source.table["a.jpg"].reshape(49, 2)).all()
    np.testing.assert_array_equal(y.sum(axis=1), np.ones(samples))
    assert y.sum() == samples
    dog, runs = tok.index["dog"], tok.index["runs"]
    assert x2[:3].tolist() == [
        [0, 0, 0, 0, 0, START],
        [0, 0, 0, 0, START, dog],
        [0, 0, 0, START, dog, runs],
    ]
    assert y.argmax(axis=1)[:3].tolist() == [dog, runs, END]
    expected_targets = tok.encode("dog runs")[1:] + tok.encode("a dog runs on grass")[1:]
    assert y.argmax(axis=1).tolist() == expected_targets
    assert UNK not in expected_targets


def test_progressive_loader_loops_forever():
    captions = {"a.jpg": ["dog runs"], "b.jpg": ["cat"]}
    tok = Tokenizer.build(["dog runs", "cat"])
    loader = ProgressiveLoader(FakeSource(["a.jpg", "b.jpg"], (3,)), captions, tok)
    steps = list(itertools.islice(iter(loader), 5))
    sizes = [y.shape[0] for _, y in steps]
    assert sizes == [3, 2, 3, 2, 3]
    np.testing.assert_array_equal(steps[0][0][1], steps[2][0][1])


def test_source_returning_the_wrong_shape_is_reported():
    class Wrong(FakeSource):
        def read(self, names):
            return np.zeros((len(names), 3), dtype=np.float32)

    captions = make_captions(2)
    tok = Tokenizer.build(["img0"])
    ds = CaptionDataset(Wrong(list(captions), (4,)), captions, tok)
    with pytest.raises(
        CaptionerError, match=r"returned shape \(2, 3\) for 2 image\(s\); expected \(2, 4\)"
    ):
        ds[0]


def test_epoch_stream_is_a_pure_function_of_the_index():
    from captioner.train.batches import EpochStream

    ds, _, _, _ = make(n_images=7, per_image=3, batch_size=4, seed=5)
    n = len(ds)
    stream = EpochStream(ds)
    assert stream.num_batches is None  # endless: one Keras iterator across epochs

    def same(a, b):
        return all(np.array_equal(x, y) for x, y in zip(
            [a[0][0], a[0][1], a[1], a[2]], [b[0][0], b[0][1], b[1], b[2]], strict=True))

    # batch i of the stream is batch i % n of epoch i // n, whatever was asked before
    later = stream[2 * n + 1]
    assert same(stream[1], ds.epoch_batch(0, 1))
    assert same(later, ds.epoch_batch(2, 1))
    assert not same(ds.epoch_batch(0, 1), ds.epoch_batch(2, 1))
    resumed = EpochStream(ds, start_epoch=2)
    assert same(resumed[1], later)
    ds.set_epoch(2)
    assert same(ds[1], later)  # agrees with the epoch-based API


@pytest.mark.training
def test_progressive_loader_feeds_keras3_fit():
    """The classic per-prefix generator trains a tutorial-style two-input model."""

    captions = make_captions(3, per_image=2)
    source = FakeSource(list(captions), (8,))
    tok = Tokenizer.build([c for caps in captions.values() for c in caps])
    loader = ProgressiveLoader(source, captions, tok)
    photo = keras.Input((8,))
    prefix = keras.Input((tok.max_length - 1,), dtype="int32")
    words = keras.layers.LSTM(4)(keras.layers.Embedding(tok.vocab_size, 4, mask_zero=True)(prefix))
    hidden = keras.layers.add([keras.layers.Dense(4)(photo), words])
    model = keras.Model([photo, prefix], keras.layers.Dense(tok.vocab_size, activation="softmax")(hidden))
    model.compile(loss="categorical_crossentropy", optimizer="adam")
    history = model.fit(loader.generate(), steps_per_epoch=loader.steps_per_epoch, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


# ----------------------------------------------------------------------------- bucketing


def test_bucketed_epoch_holds_every_caption_once_in_short_trimmed_batches():
    ds, _, captions, tok = make(n_images=60, batch_size=8, bucket=True, seed=3)
    plain, *_ = make(n_images=60, batch_size=8, seed=3)
    assert sorted(batch_order(ds)) == sorted(batch_order(plain))
    widths = []
    for (_feats, t_in), t_out, weights in all_batches(ds):
        real = (t_in != 0).sum(axis=1)  # start + words
        # trimmed to the longest caption, rounded up to a multiple of 4 steps
        assert t_in.shape[1] == min(-(-real.max() // 4) * 4, tok.max_length - 1)
        assert t_out.shape == weights.shape == t_in.shape
        assert weights.sum() == (t_out != 0).sum()
        assert (t_out != 0).sum(axis=1).min() >= 1  # no caption lost its end token
        widths.append(t_in.shape[1])
    assert min(widths) < tok.max_length - 1  # some batches really are shorter
    padding = sum(w.size - w.sum() for _, _, w in all_batches(ds))
    padding_plain = sum(w.size - w.sum() for _, _, w in all_batches(plain))
    assert padding < padding_plain / 2


def test_bucketed_order_is_a_pure_function_of_seed_and_epoch():
    a, *_ = make(n_images=40, batch_size=4, bucket=True, seed=1)
    b, *_ = make(n_images=40, batch_size=4, bucket=True, seed=1)
    assert batch_order(a) == batch_order(b)
    first = batch_order(a)
    a.set_epoch(1)
    assert batch_order(a) != first
    a.set_epoch(0)
    assert batch_order(a) == first


def test_bucketed_epoch_starts_with_its_longest_then_its_shortest_batch():
    ds, *_ = make(n_images=60, batch_size=8, bucket=True, seed=5)
    widths = [t_in.shape[1] for (_, t_in), _, _ in all_batches(ds)]
    full = widths[: len(widths) - (ds.num_samples % 8 > 0)]
    assert widths[0] == max(full) and widths[1] == min(full) and widths[0] > widths[1]


# ----------------------------------------------------------------------------- mirroring


def mirrored_dataset(n_images=40, **kwargs):
    """Captions that say "left" (and one that says neither), with a mirrored source whose
    rows are negated: a sample's first feature tells which view it read."""
    captions = {f"{k:05d}.jpg": [f"img{k} dog on the left of a man", f"img{k} dog runs"]
                for k in range(n_images)}
    names = list(captions)
    source = FakeSource(names, (6,))
    mirror = FakeSource(names, (6,))
    mirror.table = {k: -v - 1 for k, v in mirror.table.items()}  # every mirrored value < 0
    tok = Tokenizer.build([*(c for caps in captions.values() for c in caps), "right"])
    ds = CaptionDataset(source, captions, tok, batch_size=16, seed=3, mirrored=mirror, **kwargs)
    return ds


def mirrored_rows(ds, epoch: int) -> list[tuple[bool, int, str]]:
    """(read the mirrored view, image index of the features, caption) of every sample."""
    rows = []
    for i in range(len(ds)):
        (feats, t_in), _, _ = ds.epoch_batch(epoch, i)
        for f, t in zip(feats, t_in, strict=True):
            mirrored = bool(f[0] < 0)
            image = int((-f[0] - 1 if mirrored else f[0]) // 1000)
            rows.append((mirrored, image, ds.tokenizer.decode(t)))
    return rows


@pytest.mark.parametrize("in_memory", [False, True])
def test_mirrored_view_half_the_time_with_left_and_right_swapped(in_memory):
    ds = mirrored_dataset(in_memory=in_memory)
    rows = mirrored_rows(ds, 0)
    assert len(rows) == ds.num_samples == 80
    assert 0.3 < np.mean([m for m, _, _ in rows]) < 0.7
    for mirrored, image, caption in rows:
        side = "right" if mirrored else "left"
        assert caption in (f"img{image} dog on the {side} of a man", f"img{image} dog runs")
    assert sum(c.endswith("right of a man") for _, _, c in rows) > 10
    # the same epoch gives the same views; another epoch other ones
    assert mirrored_rows(ds, 0) == rows
    assert [m for m, _, _ in mirrored_rows(ds, 1)] != [m for m, _, _ in rows]


def test_batches_of_one_view_only_read_that_view():
    ds = mirrored_dataset(n_images=4, in_memory=False)
    ds.batch_size = 1  # every batch is all-plain or all-mirrored
    rows = mirrored_rows(ds, 0)
    assert {m for m, _, _ in rows} == {True, False}
    assert all(c.endswith("right of a man") for m, _, c in rows if m and "of a man" in c)


def test_without_a_mirror_nothing_is_swapped():
    ds = mirrored_dataset()
    plain = CaptionDataset(ds.features, {n: [f"img{k} dog on the left of a man"]
                                         for k, n in enumerate(ds.names)},
                           ds.tokenizer, batch_size=16, seed=3)
    assert all(not m and c.endswith("left of a man") for m, _, c in mirrored_rows(plain, 0))


def test_mirrored_source_must_fit_the_dataset():
    captions = {n: ["a left dog"] for n in ["00000.jpg", "00001.jpg", "00002.jpg"]}
    tok = Tokenizer.build(["a left dog"])
    source = FakeSource(list(captions), (6,))
    partial = FakeSource(["00000.jpg", "00002.jpg"], (6,))
    with pytest.raises(CaptionerError, match="no cached features for 1 of 3 image.*00001.jpg"):
        CaptionDataset(source, captions, tok, mirrored=partial)
    with pytest.raises(CaptionerError, match=r"mirrored features have shape \(4,\).*\(6,\)"):
        CaptionDataset(source, captions, tok, mirrored=FakeSource(list(captions), (4,)))
    with pytest.raises(CaptionerError, match="validation"):
        CaptionDataset(source, captions, tok, shuffle=False,
                       mirrored=FakeSource(list(captions), (6,)))

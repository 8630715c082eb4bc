"""Stage 4 models: shapes, step/sequence agreement, masking, configs, attention."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import ops

from captioner.model.decoders import (
    AttentionDecoder,
    InjectDecoder,
    MaskedSparseCrossEntropy,
    MergeDecoder,
    build_decoder,
)

V, T = 23, 9
CASES = [("merge", (12,)), ("merge", (3, 3, 12)), ("inject", (12,)), ("attention", (3, 3, 12)),
         ("attention", (5, 12))]


def _model(kind, shape, **kw):
    return build_decoder(kind, vocab_size=V, max_length=T, feature_shape=shape, embed_dim=8,
                         units=16, **kw)


def _inputs(shape, batch=3, seed=0):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(batch, *shape)).astype("float32")
    tokens = rng.integers(4, V, size=(batch, T - 1)).astype("int32")
    tokens[:, 0] = 2  # <start>
    return feats, tokens


@pytest.mark.parametrize(("kind", "shape"), CASES)
def test_shapes_and_step_matches_teacher_forcing(kind, shape):
    model = _model(kind, shape)
    feats, tokens = _inputs(shape)
    full = ops.convert_to_numpy(model((feats, tokens)))
    assert full.shape == (3, T - 1, V)
    state = model.init_state(feats)
    for t in range(T - 1):
        logits, state = model.step(tokens[:, t], state)
        np.testing.assert_allclose(ops.convert_to_numpy(logits), full[:, t], atol=1e-5)


@pytest.mark.parametrize(("kind", "shape"), CASES)
def test_outputs_never_depend_on_later_or_pad_tokens(kind, shape):
    model = _model(kind, shape)
    feats, tokens = _inputs(shape)
    padded = tokens.copy()
    padded[:, 5:] = 0  # right padding after position 4
    a = ops.convert_to_numpy(model((feats, tokens)))
    b = ops.convert_to_numpy(model((feats, padded)))
    np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-6)
    assert not np.allclose(a[:, 6:], b[:, 6:])


def test_loss_ignores_padding_and_averages_real_tokens():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 4, 5)).astype("float32")
    target = np.array([[1, 2, 3, 0], [4, 0, 0, 0]], "int32")
    weight = (target != 0).astype("float32")
    loss = MaskedSparseCrossEntropy()
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = [-logp[b, t, target[b, t]] for b in range(2) for t in range(4) if target[b, t]]
    value = float(loss(target, logits, sample_weight=weight))
    assert value == pytest.approx(np.mean(nll), rel=1e-5)  # mean over the 4 real tokens
    changed = logits.copy()
    changed[0, 3] += 100.0  # a pad position
    changed[1, 1:] -= 50.0
    assert float(loss(target, changed, sample_weight=weight)) == pytest.approx(value, rel=1e-6)


def test_label_smoothing_formula():
    logits = np.array([[[2.0, 0.5, -1.0]]], "float32")
    target = np.array([[0]], "int32")
    logp = logits[0, 0] - np.log(np.exp(logits[0, 0]).sum())
    expected = 0.9 * -logp[0] + 0.1 * -logp.mean()
    assert float(MaskedSparseCrossEntropy(0.1)(target, logits)) == pytest.approx(expected, rel=1e-6)
    config = MaskedSparseCrossEntropy(0.1).get_config()
    assert MaskedSparseCrossEntropy.from_config(config).label_smoothing == 0.1


@pytest.mark.parametrize(("cls", "shape", "extra"), [
    (MergeDecoder, (12,), {}),
    (InjectDecoder, (12,), {}),
    (AttentionDecoder, (3, 3, 12), {"attention_units": 7, "attention_reg": 0.5}),
])
def test_get_config_round_trip(cls, shape, extra):
    model = cls(vocab_size=V, max_length=T, feature_shape=shape, embed_dim=8, units=16,
                dropout=0.3, **extra).build_for_inputs()
    config = model.get_config()
    assert config["feature_shape"] == list(shape) and config["dropout"] == 0.3
    clone = cls.from_config(config).build_for_inputs()
    assert clone.get_config() == config
    clone.set_weights(model.get_weights())
    feats, tokens = _inputs(shape)
    np.testing.assert_array_equal(ops.convert_to_numpy(model((feats, tokens))),
                                  ops.convert_to_numpy(clone((feats, tokens))))
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(model))
    assert type(restored) is cls and restored.get_config() == config


def test_attention_weights_sum_to_one_over_locations():
    model = _model("attention", (3, 3, 12))
    feats, tokens = _inputs((3, 3, 12))
    alpha = ops.convert_to_numpy(model.attention_weights(feats, tokens))
    assert alpha.shape == (3, T - 1, 9)
    np.testing.assert_allclose(alpha.sum(-1), 1.0, atol=1e-5)
    assert (alpha >= 0).all()
    state = model.init_state(feats)
    _, state = model.step(tokens[:, 0], state)
    np.testing.assert_allclose(ops.convert_to_numpy(state["alpha"]), alpha[:, 0], atol=1e-5)


def test_attention_regulariser_is_added_in_training_only():
    model = _model("attention", (3, 3, 12), attention_reg=2.0)
    feats, tokens = _inputs((3, 3, 12))
    model((feats, tokens), training=False)
    assert len(model.losses) == 0
    model((feats, tokens), training=True)
    assert len(model.losses) == 1 and float(model.losses[0]) > 0


def test_attention_needs_spatial_features():
    with pytest.raises(ValueError, match="extract the conv layer"):
        _model("attention", (12,))
    with pytest.raises(ValueError, match="unknown decoder"):
        _model("transformer", (12,))


def test_attention_decoder_runs_with_a_length_known_only_at_run_time():
    """Length-bucketed batches make TensorFlow relax the caption length to None; the scan path
    must give the same logits as the unrolled one."""
    tf = pytest.importorskip("tensorflow")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("tf.function relaxation is TensorFlow-specific")
    from captioner.model.decoders import build_decoder

    model = build_decoder("attention", vocab_size=30, max_length=9, feature_shape=(2, 2, 8),
                          embed_dim=6, units=5, attention_units=4)
    feats = np.random.default_rng(0).random((3, 2, 2, 8)).astype("float32")
    tokens = np.random.default_rng(1).integers(1, 30, (3, 7)).astype("int32")
    unrolled = keras.ops.convert_to_numpy(model((feats, tokens)))
    spec = [tf.TensorSpec((None, 2, 2, 8)), tf.TensorSpec((None, None), tf.int32)]
    relaxed = tf.function(lambda f, t: model((f, t)), input_signature=spec)
    np.testing.assert_allclose(relaxed(feats, tokens).numpy(), unrolled, atol=1e-5)
    np.testing.assert_allclose(relaxed(feats, tokens[:, :4]).numpy(), unrolled[:, :4], atol=1e-5)

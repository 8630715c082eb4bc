"""Stage 4: LSTM caption decoders trained with teacher forcing.

Every decoder maps ``(features, tokens_in)`` to next-token logits ``(B, T, V)`` for whole
sequences at once (teacher forcing), and offers the same computation one token at a time:
``init_state(features) -> state`` and ``step(tokens, state) -> (logits, state)``, which the
search in :mod:`captioner.inference.decoding` drives at inference. Both paths share the same layers, so
they agree to float precision (tested).

- :class:`MergeDecoder`: the classic Flickr8k tutorial model (image and language branches
  added after the LSTM), trained on full sequences instead of one sample per prefix.
- :class:`InjectDecoder`: Show and Tell; the image initialises the LSTM state.
- :class:`AttentionDecoder`: Show, Attend and Tell soft attention over spatial features.

Padding is right-padding, so outputs at real positions never depend on pad tokens; the loss
ignores pad positions through sample weights (see :class:`MaskedSparseCrossEntropy`).
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import keras
from keras import layers, ops

from captioner.errors import CaptionerError
from captioner.text.tokenizer import END


def _spatial(features, feature_shape: tuple[int, ...]):
    """Features as (B, L, D) whatever the cached layout."""
    if len(feature_shape) == 3:  # (H, W, D)
        return ops.reshape(features, (-1, feature_shape[0] * feature_shape[1], feature_shape[2]))
    return features


def _vector(features, feature_shape: tuple[int, ...]):
    """Features as (B, D): spatial features are averaged over locations."""
    if len(feature_shape) == 1:
        return features
    return ops.mean(_spatial(features, feature_shape), axis=1)


class CaptionDecoder(keras.Model):
    """Shared constructor arguments (the config) and helpers of all decoders."""

    kind = "base"

    def __init__(
        self,
        vocab_size: int,
        max_length: int,
        feature_shape: tuple[int, ...] | list[int],
        embed_dim: int = 256,
        units: int = 256,
        dropout: float = 0.5,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.vocab_size = int(vocab_size)
        self.max_length = int(max_length)
        self.feature_shape = tuple(int(d) for d in feature_shape)
        self.embed_dim = int(embed_dim)
        self.units = int(units)
        self.dropout_rate = float(dropout)

    def get_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "vocab_size": self.vocab_size,
            "max_length": self.max_length,
            "feature_shape": list(self.feature_shape),
            "embed_dim": self.embed_dim,
            "units": self.units,
            "dropout": self.dropout_rate,
        }

    def build_for_inputs(self) -> CaptionDecoder:
        """Create the weights by calling the model once on zeros. One token is enough (no
        weight depends on the length) and ~20x faster than a whole caption, eagerly."""
        feats = ops.zeros((1, *self.feature_shape))
        tokens = ops.zeros((1, 1), dtype="int32")
        self((feats, tokens), training=False)
        return self

    def _lstm_cell_step(self, cell, x, h, c):
        out, (h, c) = cell(x, [h, c], training=False)
        return out, h, c

    per_image: tuple[str, ...] = ()  # state entries no step changes: kept once per image

    def step_shared(self, tokens, state: dict, shared: dict):
        """:meth:`step` with the ``per_image`` entries in ``shared``, one row per image (G rows)
        while ``state`` has k rows per image (rows ``g*k .. g*k+k-1`` are image g's)."""
        return self.step(tokens, {**state, **shared})


@keras.saving.register_keras_serializable(package="captioner")
class MergeDecoder(CaptionDecoder):
    """Image → Dropout → Dense(relu); words → Embedding → Dropout → LSTM; add → Dense → logits."""

    kind = "merge"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.image_dropout = layers.Dropout(self.dropout_rate)
        self.image_dense = layers.Dense(self.units, activation="relu", name="image_dense")
        self.embedding = layers.Embedding(self.vocab_size, self.embed_dim, name="embedding")
        self.word_dropout = layers.Dropout(self.dropout_rate)
        self.lstm = layers.LSTM(self.units, return_sequences=True, name="lstm")
        self.merge_dense = layers.Dense(self.units, activation="relu", name="merge_dense")
        self.logits = layers.Dense(self.vocab_size, dtype="float32", name="logits")

    def call(self, inputs, training=False):
        features, tokens = inputs
        img = self.image_dense(self.image_dropout(_vector(features, self.feature_shape), training=training))
        words = self.word_dropout(self.embedding(tokens), training=training)  # (B, T, E)
        seq = self.lstm(words, training=training)  # (B, T, U)
        return self.logits(self.merge_dense(seq + ops.expand_dims(img, 1)))  # (B, T, V)

    def init_state(self, features) -> dict:
        img = self.image_dense(_vector(features, self.feature_shape))
        zeros = ops.zeros((ops.shape(img)[0], self.units), dtype=img.dtype)
        return {"h": zeros, "c": zeros, "image": img}

    def step(self, tokens, state: dict):
        x = self.embedding(tokens)  # (B, E)
        out, h, c = self._lstm_cell_step(self.lstm.cell, x, state["h"], state["c"])
        logits = self.logits(self.merge_dense(out + state["image"]))  # (B, V)
        return logits, {"h": h, "c": c, "image": state["image"]}


@keras.saving.register_keras_serializable(package="captioner")
class InjectDecoder(CaptionDecoder):
    """Show and Tell: the image embedding initialises the LSTM state (h0, c0)."""

    kind = "inject"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.image_dropout = layers.Dropout(self.dropout_rate)
        self.init_h = layers.Dense(self.units, activation="tanh", name="init_h")
        self.init_c = layers.Dense(self.units, activation="tanh", name="init_c")
        self.embedding = layers.Embedding(self.vocab_size, self.embed_dim, name="embedding")
        self.word_dropout = layers.Dropout(self.dropout_rate)
        self.lstm = layers.LSTM(self.units, return_sequences=True, name="lstm")
        self.out_dropout = layers.Dropout(self.dropout_rate)
        self.logits = layers.Dense(self.vocab_size, dtype="float32", name="logits")

    def _initial(self, features, training=False):
        img = self.image_dropout(_vector(features, self.feature_shape), training=training)
        return self.init_h(img), self.init_c(img)

    def call(self, inputs, training=False):
        features, tokens = inputs
        h0, c0 = self._initial(features, training)
        words = self.word_dropout(self.embedding(tokens), training=training)  # (B, T, E)
        seq = self.lstm(words, initial_state=[h0, c0], training=training)  # (B, T, U)
        return self.logits(self.out_dropout(seq, training=training))  # (B, T, V)

    def init_state(self, features) -> dict:
        h, c = self._initial(features)
        return {"h": h, "c": c}

    def step(self, tokens, state: dict):
        x = self.embedding(tokens)
        out, h, c = self._lstm_cell_step(self.lstm.cell, x, state["h"], state["c"])
        return self.logits(out), {"h": h, "c": c}


@keras.saving.register_keras_serializable(package="captioner")
class AttentionDecoder(CaptionDecoder):
    """Show, Attend and Tell soft attention over (L, D) features.

    Each step: additive attention ``e = w·tanh(K f + W h)``, weights ``alpha = softmax(e)``
    over the L locations, context ``z = beta * sum(alpha f)`` with a scalar gate
    ``beta = sigmoid(w_b·h)``; the LSTM reads ``[embedding, z]``; the deep output layer
    computes ``logits = L_o(dropout(E y + L_h h + L_z z))``. The initial state comes from the
    mean feature. Training adds the doubly stochastic regulariser
    ``attention_reg * mean_B sum_L (1 - sum_t alpha_tl)^2`` over real (non-pad) steps.
    """

    kind = "attention"

    def __init__(self, *args, attention_units: int = 256, attention_reg: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        if len(self.feature_shape) not in (2, 3):
            raise ValueError(
                f"the attention decoder needs spatial features (L, D) or (H, W, D), got "
                f"{self.feature_shape}; extract the conv layer"
            )
        self.attention_units = int(attention_units)
        self.attention_reg = float(attention_reg)
        self.locations = math.prod(self.feature_shape[:-1])
        self.init_h = layers.Dense(self.units, activation="tanh", name="init_h")
        self.init_c = layers.Dense(self.units, activation="tanh", name="init_c")
        self.key_proj = layers.Dense(self.attention_units, name="key_proj")
        self.query_proj = layers.Dense(self.attention_units, name="query_proj")
        self.score = layers.Dense(1, name="attention_score")
        self.gate = layers.Dense(1, activation="sigmoid", name="gate")
        self.embedding = layers.Embedding(self.vocab_size, self.embed_dim, name="embedding")
        self.word_dropout = layers.Dropout(self.dropout_rate)
        self.cell = layers.LSTMCell(self.units, name="lstm_cell")
        self.h_out = layers.Dense(self.embed_dim, name="h_out")
        self.z_out = layers.Dense(self.embed_dim, name="z_out")
        self.out_dropout = layers.Dropout(self.dropout_rate)
        self.logits = layers.Dense(self.vocab_size, dtype="float32", name="logits")

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "attention_units": self.attention_units,
            "attention_reg": self.attention_reg,
        }

    def _attend(self, feats, keys, h):
        """Context vector (B, D) and attention weights (B, L) for hidden state h (B, U)."""
        query = ops.expand_dims(self.query_proj(h), 1)  # (B, 1, A)
        energy = ops.squeeze(self.score(ops.tanh(keys + query)), -1)  # (B, L)
        alpha = ops.softmax(energy, axis=-1)  # (B, L)
        context = ops.sum(ops.expand_dims(alpha, -1) * feats, axis=1)  # (B, D)
        return self.gate(h) * context, alpha

    def _attend_shared(self, feats, keys, h):
        """:meth:`_attend` for h (G*k, U) over feats (G, L, D) and keys (G, L, A) kept once per
        image: rows g*k .. g*k+k-1 attend to image g (no per-row copy of the features)."""
        query = self.query_proj(h)  # (G*k, A)
        query = ops.reshape(query, (ops.shape(feats)[0], -1, 1, ops.shape(query)[-1]))
        energy = ops.squeeze(self.score(ops.tanh(ops.expand_dims(keys, 1) + query)), -1)
        alpha = ops.softmax(energy, axis=-1)  # (G, k, L)
        context = ops.reshape(ops.matmul(alpha, feats), (-1, ops.shape(feats)[-1]))  # (G*k, D)
        return self.gate(h) * context, ops.reshape(alpha, (-1, ops.shape(alpha)[-1]))

    def _recur(self, emb, h, c, feats, keys, attend=None):
        """One recurrent step: deep-output features (B, E), new state, attention (B, L)."""
        context, alpha = (attend or self._attend)(feats, keys, h)
        x = ops.concatenate([emb, context], axis=-1)  # (B, E + D)
        out, (h, c) = self.cell(x, [h, c], training=False)
        deep = emb + self.h_out(out) + self.z_out(context)  # (B, E)
        return deep, h, c, alpha

    def _one_step(self, emb, h, c, feats, keys, training=False, attend=None):
        deep, h, c, alpha = self._recur(emb, h, c, feats, keys, attend)
        logits = self.logits(self.out_dropout(deep, training=training))  # (B, V)
        return logits, h, c, alpha

    def _prepare(self, features):
        feats = _spatial(features, self.feature_shape)  # (B, L, D)
        mean = ops.mean(feats, axis=1)
        return feats, self.key_proj(feats), self.init_h(mean), self.init_c(mean)

    def run(self, features, tokens, training=False):
        """Teacher-forced logits (B, T, V) and attention weights (B, T, L).

        With a static caption length the steps are unrolled; when the length is only known at
        run time (TensorFlow relaxes shapes once length-bucketed batches vary) they run in a
        symbolic ``ops.scan``. The output projection runs once over all steps either way.
        """
        feats, keys, h, c = self._prepare(features)
        embs = self.word_dropout(self.embedding(tokens), training=training)  # (B, T, E)
        if tokens.shape[1] is not None:
            deeps, alphas = [], []
            for t in range(tokens.shape[1]):
                deep, h, c, alpha = self._recur(embs[:, t], h, c, feats, keys)
                deeps.append(deep)
                alphas.append(alpha)
            deep, alpha = ops.stack(deeps, axis=1), ops.stack(alphas, axis=1)
        else:
            def body(carry, emb):
                # Keras' TensorFlow scan stacks outputs shaped like the carry, so the step's
                # outputs (deep, alpha) ride along in it.
                step = self._recur(emb, carry[0], carry[1], feats, keys)
                carry = (step[1], step[2], step[0], step[3])  # (h, c, deep, alpha)
                return carry, carry

            batch = ops.shape(feats)[0]
            init = (h, c, ops.zeros((batch, self.embed_dim), h.dtype),
                    ops.zeros((batch, self.locations), h.dtype))
            _, ys = ops.scan(body, init, ops.transpose(embs, (1, 0, 2)))  # each (T, B, ...)
            deep = ops.transpose(ys[2], (1, 0, 2))  # (B, T, E)
            alpha = ops.transpose(ys[3], (1, 0, 2))  # (B, T, L)
        logits = self.logits(self.out_dropout(deep, training=training))  # (B, T, V)
        return logits, alpha

    def call(self, inputs, training=False):
        features, tokens = inputs
        logits, alpha = self.run(features, tokens, training)
        if training and self.attention_reg > 0:
            real = ops.cast(ops.logical_and(tokens != 0, tokens != END), alpha.dtype)  # (B, T)
            coverage = ops.sum(alpha * ops.expand_dims(real, -1), axis=1)  # (B, L)
            penalty = ops.mean(ops.sum(ops.square(1.0 - coverage), axis=-1))
            self.add_loss(self.attention_reg * ops.cast(penalty, "float32"))
        return logits

    def attention_weights(self, features, tokens):
        """Attention weights (B, T, L) for teacher-forced tokens (for visualisation)."""
        return self.run(features, tokens, training=False)[1]

    def init_state(self, features) -> dict:
        feats, keys, h, c = self._prepare(features)
        alpha = ops.zeros((ops.shape(feats)[0], self.locations), dtype=feats.dtype)
        return {"h": h, "c": c, "features": feats, "keys": keys, "alpha": alpha}

    def step(self, tokens, state: dict):
        emb = self.embedding(tokens)
        logits, h, c, alpha = self._one_step(emb, state["h"], state["c"], state["features"], state["keys"])
        return logits, {**state, "h": h, "c": c, "alpha": alpha}

    per_image = ("features", "keys")

    def step_shared(self, tokens, state: dict, shared: dict):
        emb = self.embedding(tokens)
        logits, h, c, alpha = self._one_step(emb, state["h"], state["c"], shared["features"],
                                             shared["keys"], attend=self._attend_shared)
        return logits, {**state, "h": h, "c": c, "alpha": alpha}


# The registry: decoder kind -> class. Run configs name a kind; everything else asks here.
DECODER_CLASSES: dict[str, type[CaptionDecoder]] = {
    cls.kind: cls for cls in (MergeDecoder, InjectDecoder, AttentionDecoder)
}
DECODERS = tuple(DECODER_CLASSES)


def _decoder_class(kind: str) -> type[CaptionDecoder]:
    if kind not in DECODER_CLASSES:
        raise ValueError(f"unknown decoder '{kind}'; choose one of: {', '.join(DECODERS)}")
    return DECODER_CLASSES[kind]


def decoder_config(kind: str, **settings) -> dict[str, Any]:
    """The constructor arguments (the config) of decoder ``kind``, picked from ``settings``
    (e.g. every training setting plus vocab_size, max_length and feature_shape)."""
    names = []
    for cls in (CaptionDecoder, _decoder_class(kind)):
        params = inspect.signature(cls.__init__).parameters.values()
        names += [p.name for p in params if p.kind is p.KEYWORD_ONLY or
                  (p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "self")]
    return {name: settings[name] for name in dict.fromkeys(names) if name in settings}


def build_decoder(kind: str, **config) -> CaptionDecoder:
    """Build (and create the weights of) the decoder ``kind`` from its config."""
    return _decoder_class(kind)(**config).build_for_inputs()


@keras.saving.register_keras_serializable(package="captioner")
class MaskedSparseCrossEntropy(keras.losses.Loss):
    """Sparse cross-entropy on logits with optional label smoothing.

    Targets are integer ids (never one-hot). With smoothing ``eps`` the loss is
    ``(1 - eps) * NLL(target) + eps * mean_v(-log p_v)``. Pad positions are excluded by the
    sample weights the data generator yields; the reduction averages over real tokens only.
    """

    def __init__(self, label_smoothing: float = 0.0, name: str = "caption_xent", **kwargs):
        kwargs.setdefault("reduction", "mean_with_sample_weight")
        super().__init__(name=name, **kwargs)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        logp = ops.log_softmax(ops.cast(y_pred, "float32"), axis=-1)  # (B, T, V)
        target = ops.expand_dims(ops.cast(y_true, "int32"), -1)
        nll = -ops.squeeze(ops.take_along_axis(logp, target, axis=-1), -1)  # (B, T)
        if self.label_smoothing == 0:
            return nll
        uniform = -ops.mean(logp, axis=-1)
        return (1.0 - self.label_smoothing) * nll + self.label_smoothing * uniform

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


def build_checked_decoder(kind: str, config: dict[str, Any], config_path):
    """The ``kind`` decoder of a (schema-checked) config; a failure names the file and field."""
    try:
        return build_decoder(kind, **config)
    except Exception as exc:
        raise CaptionerError(f"{config_path}: decoder.config: cannot build the {kind} decoder "
                             f"({' '.join(str(exc).split())[:200]})") from None


def load_checked_decoder(kind: str, config: dict[str, Any], weights, config_path):
    """The ``kind`` decoder of ``config`` with the weights file ``weights`` (a Path), checked
    layer by layer first (:func:`captioner.formats.run_checks.check_weights`); failures name the files."""
    from captioner.formats.run_checks import check_weights

    decoder = build_checked_decoder(kind, config, config_path)
    check_weights(decoder, weights, config_path)
    try:
        decoder.load_weights(weights)
    except Exception as exc:
        raise CaptionerError(f"{weights} does not fit the decoder in {config_path}: "
                             f"{' '.join(str(exc).split())[:200]}") from None
    return decoder

"""Stage 4: train a decoder with teacher forcing into a self-contained, resumable run folder.

The run folder's files and their formats belong to :mod:`captioner.formats.run_folder` (config, history),
:mod:`captioner.model.checkpoints` (checkpoint and weight files) and :mod:`captioner.train.monitor` (the
per-epoch callback that writes them). A checkpoint is written atomically after every epoch,
so a run killed at any moment loses at most the epoch in flight; ``--resume`` continues it.
Keras and numpy are imported inside functions, so the CLI can read the defaults cheaply.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

from captioner import option_checks as checks
from captioner.errors import CaptionerError, OptionError
from captioner.formats.run_folder import (
    CHECKPOINT,
    CONFIG_FILE,
    HISTORY,
    LOGS_DIR,
    SOURCE_KEYS,
    TOKENIZER_FILE,
    XENT,
    DecoderInfo,
    EncoderInfo,
    FileRef,
    RunConfig,
    preset_decoding,
    versions,
)

SCHEDULES = ("constant", "cosine", "plateau")
SELECT_ON = ("bleu4", "cider", "bleu4+cider")  # dev scores that can pick best.weights.h5
PATH_FIELDS = (*SOURCE_KEYS, "out")  # TrainConfig fields that name files, not settings
MEASURE_ONLY = ("train_score_images",)  # settings that only measure: no weight depends on them


@dataclass
class TrainConfig:
    """Every argument of a training run; saved in ``config.json``."""

    captions: str
    train_features: str
    out: str
    val_features: str | None = None
    mirrored_features: str | None = None  # the training images' mirrored features: augmentation
    decoder: str = "merge"
    epochs: int = 20
    batch_size: int = 64
    embed_dim: int = 256
    units: int = 256
    dropout: float = 0.5
    attention_units: int = 256
    attention_reg: float = 1.0
    min_count: int = 5
    max_length: int | None = None
    learning_rate: float = 1e-3
    schedule: str = "constant"
    warmup_epochs: float = 1.0
    min_learning_rate: float = 1e-5
    plateau_factor: float = 0.5
    plateau_patience: int = 2
    clipnorm: float = 5.0
    label_smoothing: float = 0.0
    patience: int = 5
    keep_checkpoints: int = 2
    val_bleu_images: int = 200
    train_score_images: int = 0  # training images scored each epoch too: the gap shows memorising
    val_beam_size: int = 1  # beam size of the per-epoch dev captions (1: greedy)
    select_on: str = "bleu4"  # dev score that picks best.weights.h5: bleu4, cider, bleu4+cider
    bucket: bool = True  # batch captions of similar length; no steps spent on padding
    seed: int = 0
    mixed_precision: bool = False
    in_memory: bool = True
    max_train_images: int | None = None
    preset: str | None = None
    distribute: bool = False

    def decoder_config(self, vocab_size: int, max_length: int, feature_shape: tuple[int, ...]) -> dict:
        """Constructor arguments of the decoder (its Keras config; the registry in
        :mod:`captioner.model.decoders` knows which settings each kind takes)."""
        from captioner.model.decoders import decoder_config

        settings = {**dataclasses.asdict(self), "vocab_size": vocab_size,
                    "max_length": max_length, "feature_shape": list(feature_shape)}
        return decoder_config(self.decoder, **settings)


# --------------------------------------------------------------------------- data


def _load_split(captions_path: str, features_path: str, limit: int | None = None):
    """(reader, cleaned captions of the images that have features) for one split."""
    from captioner.features.cache import open_features

    reader = open_features(features_path)
    return reader, split_captions(reader, captions_path, features_path, limit)


def split_captions(reader, captions_path: str, features_path: str,
                   limit: int | None = None) -> dict[str, list[str]]:
    """Cleaned captions of the images ``reader`` has features for (sorted names, at most
    ``limit``); one error line when none of them has a caption."""
    from captioner.text.captions import load_captions
    from captioner.text.cleaning import clean_captions

    captions = load_captions(captions_path)
    names = [n for n in reader.done_names if n in captions]
    if not names:
        raise CaptionerError(
            f"none of the {len(reader.done_names)} images in {features_path} has a caption in "
            f"{captions_path}; are they from the same data set?"
        )
    names = sorted(names)[:limit] if limit else sorted(names)
    return clean_captions({n: captions[n] for n in names})


# --------------------------------------------------------------------------- schedule


def learning_rate(config: TrainConfig, steps_per_epoch: int):
    """A float (constant, plateau) or a warm-up + cosine schedule."""
    import keras

    if config.schedule not in SCHEDULES:
        raise CaptionerError(f"unknown schedule '{config.schedule}'; choose one of {SCHEDULES}")
    if config.schedule != "cosine":
        return config.learning_rate
    total = max(config.epochs * steps_per_epoch, 1)
    warmup = int(config.warmup_epochs * steps_per_epoch)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else config.learning_rate,
        decay_steps=max(total - warmup, 1),
        alpha=config.min_learning_rate / config.learning_rate,
        warmup_target=config.learning_rate if warmup else None,
        warmup_steps=warmup,
    )


# --------------------------------------------------------------------------- train


def _prepare_run(config: TrainConfig, resume: bool) -> tuple[Path, TrainConfig, RunConfig | None]:
    """The run folder, the config to run and the saved one; creates nothing."""
    run = Path(config.out)
    if resume:
        saved = RunConfig.load(run)
        merged = _resumed(config, saved, run)
        _check_epochs(run, merged.epochs, given=config.epochs is not None)
        return run, merged, saved
    if run.exists() and not run.is_dir():
        raise OptionError("out", f"{run} is a file; give a folder for the run")
    if (run / CONFIG_FILE).exists() and (run / CHECKPOINT).exists():
        raise OptionError(
            "out", f"{run} already holds a run; resume it to continue, or choose another folder"
        )
    return run, config, None


def _create_run(run: Path, saved: RunConfig | None) -> None:
    """Make the run folder, only once every check passed. A folder left by an attempt that
    never finished an epoch (a config but no checkpoint) is started again, not refused."""
    if saved is None and (run / CONFIG_FILE).exists():
        print(f"note: {run} holds no finished epoch; starting it again", file=sys.stderr)
        for name in (CONFIG_FILE, TOKENIZER_FILE, HISTORY):
            (run / name).unlink(missing_ok=True)
    run.mkdir(parents=True, exist_ok=True)


class RunFinished(Exception):
    """A resumed run has nothing left to train; the message says so in one line."""


def _check_epochs(run: Path, epochs: int, given: bool) -> None:
    """Refuse ``--epochs`` below the epochs a run has done; :class:`RunFinished` when it has
    none left (its own schedule, or ``--epochs``, done, or stopped early)."""
    from captioner.model.checkpoints import checkpoint_progress

    done, stopped = checkpoint_progress(run / CHECKPOINT)
    if given and epochs < done:
        raise OptionError("epochs", f"{epochs} is below the {done} epochs {run} has done; "
                          f"give more than {done} to train on, or leave it out")
    if stopped or done >= epochs:
        why = "stopped early after" if stopped else "has finished"
        raise RunFinished(f"{run} {why} {done} of its {epochs} epochs; nothing to train "
                          f"(resuming with more epochs than {done} trains on)")


def _resumed(config: TrainConfig, saved: RunConfig, run: Path) -> TrainConfig:
    """The saved settings, the input files given now (else where the run found them) and the
    number of epochs: the run's own unless ``config.epochs`` is given (it may extend a run)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - set(PATH_FIELDS)
    paths = {"out": str(run)}
    for key in SOURCE_KEYS:
        ref = saved.sources.get(key)
        found = ref.locate(run) if ref else None
        paths[key] = getattr(config, key) or (str(found) if found else None)
        if ref and not paths[key]:
            raise CaptionerError(f"{run} was trained on {ref.name}, which is no longer at "
                                 f"{ref.path}; pass --{key.replace('_', '-')} to resume")
    merged = TrainConfig(**paths, **{k: v for k, v in saved.training.items() if k in fields})
    merged.epochs = config.epochs if config.epochs is not None else merged.epochs
    merged.distribute = config.distribute  # how to run, not what to train
    return merged


def _mirrored(config: TrainConfig, train_reader, names: list[str]):
    """The reader of ``config.mirrored_features`` (None without), checked against the
    training cache's encoder and ``names`` (the training images): each misfit is one line."""
    if not config.mirrored_features:
        return None
    from captioner.features.cache import differences, open_features
    from captioner.train.batches import check_features

    reader = open_features(config.mirrored_features)
    if not reader.attrs.get("mirrored"):
        raise CaptionerError(f"{config.mirrored_features} holds features of unmirrored photos; "
                             "make the mirrored cache with `captioner extract --mirror`")
    encoder = {k: train_reader.attrs.get(k) for k in ("encoder", "layer", "preprocessing")}
    if lines := differences(reader.attrs, encoder):
        raise CaptionerError(f"{config.mirrored_features}: not the training cache's encoder "
                             f"({'; '.join(lines)}); extract the mirrored photos with it")
    check_features(reader, names, f"run `captioner extract --mirror` on the training photos "
                                  f"into {config.mirrored_features}")
    return reader


def _val_sample(config: TrainConfig):
    """(reader, captions, (features, references) of the fixed BLEU sample) of the dev split."""
    if not config.val_features:
        return None, None, None
    reader, caps = _load_split(config.captions, config.val_features)
    return reader, caps, scored_sample(reader, caps, config.val_bleu_images)


def scored_sample(reader, caps: dict, count: int):
    """(features, references) of the first ``count`` images of a split by name, captioned and
    scored every epoch; None when ``count`` is 0. On the training split (``train_score_images``)
    its scores far above the dev ones show the decoder reciting its training captions."""
    if count <= 0:
        return None
    from captioner.train.batches import read_features

    sample = sorted(caps)[:count]
    return read_features(reader, sample), {n: caps[n] for n in sample}


def train(config: TrainConfig, resume: bool = False, verbose: int = 1) -> Path:
    """Train (or resume) a run; returns the run folder. ``verbose``: 0 silent, else a bar inside
    every epoch (on a terminal) and one line per epoch. With ``mixed_precision`` the float16
    policy holds for this call only; ``distribute``: data-parallel over all local devices
    (JAX; see :mod:`captioner.train.distributed`)."""
    import keras

    from captioner.train.distributed import data_parallel

    previous = keras.config.dtype_policy()
    try:
        with data_parallel(config.distribute) as devices:
            return _train(config, resume, verbose, devices)
    except RunFinished as done:
        print(done, file=sys.stderr)
        return Path(config.out)
    finally:
        keras.config.set_dtype_policy(previous)


def _train(config: TrainConfig, resume: bool, verbose: int, devices: int) -> Path:
    import keras

    from captioner.model.checkpoints import WeightsExporter, check_run_space, load_checkpoint
    from captioner.model.decoders import DECODERS, MaskedSparseCrossEntropy, build_decoder
    from captioner.text.tokenizer import Tokenizer
    from captioner.train.batches import CaptionDataset, EpochStream
    from captioner.train.monitor import RunMonitor

    if config.decoder not in DECODERS:
        raise CaptionerError(f"unknown decoder '{config.decoder}'; choose one of: "
                             f"{', '.join(DECODERS)}")
    if config.select_on not in SELECT_ON:
        raise OptionError("select_on", f"'{config.select_on}' is unknown; choose one of {SELECT_ON}")
    run, config, saved = _prepare_run(config, resume)
    checks.train_config(config)
    train_reader, train_caps = _load_split(config.captions, config.train_features,
                                           config.max_train_images)
    val_reader, val_caps, val_sample = _val_sample(config)
    checks.features_fit(config.decoder, train_reader, val_reader)
    mirrored = _mirrored(config, train_reader, list(train_caps))
    _create_run(run, saved)  # only now, when every check passed
    if saved is not None and saved.training.get("epochs") != config.epochs:  # --epochs changed it
        dataclasses.replace(saved, training={**saved.training, "epochs": config.epochs}).save(run)
    keras.utils.set_random_seed(config.seed)
    if config.mixed_precision:
        keras.config.set_dtype_policy("mixed_float16")
    if saved is None:
        texts = [c for caps in train_caps.values() for c in caps]
        tokenizer = Tokenizer.build(texts, min_count=config.min_count, max_length=config.max_length)
        tokenizer.save(run / TOKENIZER_FILE)
    else:
        tokenizer = Tokenizer.load(run / TOKENIZER_FILE)
    train_ds = CaptionDataset(train_reader, train_caps, tokenizer, batch_size=config.batch_size,
                              shuffle=True, seed=config.seed, in_memory=config.in_memory,
                              pad_to=devices, bucket=config.bucket, mirrored=mirrored)
    val_ds = None
    if val_reader is not None:
        val_ds = CaptionDataset(val_reader, val_caps, tokenizer, batch_size=config.batch_size,
                                shuffle=False, in_memory=config.in_memory, pad_to=devices, bucket=config.bucket)
    dec_config = config.decoder_config(tokenizer.vocab_size, tokenizer.max_length,
                                       tuple(train_reader.feature_shape))
    model = build_decoder(config.decoder, **dec_config)
    check_run_space(run, model, config.keep_checkpoints)  # one line now, not after an epoch
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate(config, len(train_ds)), clipnorm=config.clipnorm),
        loss=MaskedSparseCrossEntropy(config.label_smoothing),
        weighted_metrics=[keras.metrics.SparseCategoricalCrossentropy(name=XENT, from_logits=True)],
    )
    if saved is None:
        created = run_config(run, config, dec_config, train_reader.attrs, len(train_caps))
        created.save(run)
        from captioner.inference import grounding
        from captioner.train import neighbour_index

        grounding.attach(run, created)  # the encoder's ImageNet head, when it has one
        neighbour_index.attach(run, train_reader, train_caps, created)  # for --consensus K
    initial_epoch, monitor_state = 0, {}
    if resume and (run / CHECKPOINT).is_file():
        initial_epoch, monitor_state = load_checkpoint(run / CHECKPOINT, model)
    if monitor_state.get("stopped_early") or initial_epoch >= config.epochs:
        return run
    stream = EpochStream(train_ds, start_epoch=initial_epoch)
    exporter = WeightsExporter(config.decoder, dec_config)
    stored = saved.decoding if saved is not None else preset_decoding(config.preset)
    dev = stored.replace(beam_size=config.val_beam_size, n_best=1)  # the run's, at the dev beam
    callbacks = [RunMonitor(config, run, val_sample, tokenizer, monitor_state, exporter, dev,
                            train_sample=scored_sample(train_reader, train_caps,
                                                       config.train_score_images))]
    callbacks += _tensorboard(run)
    if verbose:
        from captioner.progress import epoch_progress

        callbacks.append(epoch_progress(config.epochs, len(train_ds)))
    model.fit(stream, steps_per_epoch=len(train_ds), shuffle=False, validation_data=val_ds,
              epochs=config.epochs, initial_epoch=initial_epoch, callbacks=callbacks, verbose=0)
    return run


def _tensorboard(run: Path) -> list:
    import importlib.util

    import keras

    if keras.backend.backend() != "tensorflow" or not importlib.util.find_spec("tensorboard"):
        return []
    return [keras.callbacks.TensorBoard(log_dir=str(run / LOGS_DIR), write_graph=False)]


def run_config(run: Path, config: TrainConfig, dec_config: dict, attrs: dict,
               n_images: int) -> RunConfig:
    """The RunConfig of a new run: settings, decoder, the cache's encoder and input provenance."""
    from captioner.text.cleaning import DEFAULT_RULES

    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in PATH_FIELDS}
    sources = {k: FileRef.of(getattr(config, k), run) if getattr(config, k) else None
               for k in SOURCE_KEYS}
    return RunConfig(
        encoder=EncoderInfo.from_cache(attrs),
        decoder=DecoderInfo(config.decoder, dec_config),
        training=settings,
        cleaning=DEFAULT_RULES.to_dict(),
        sources=sources,
        preset=config.preset,
        decoding=preset_decoding(config.preset),  # how its captions are decoded by default
        train_images=n_images,
        seed=config.seed,
        versions=versions(),
    )

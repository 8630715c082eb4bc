"""Self-critical sequence training (Rennie et al. 2017): fine-tune a cross-entropy run with the
CIDEr-D reward of its own sampled captions.

Each step samples ``samples`` captions for each of ``batch_images`` training images. A
caption's reward is its CIDEr-D against the image's references, with document frequencies
from all training references; its baseline is the mean reward of the other samples of the same
image, so no greedy pass is needed and the advantages of one image sum to zero. The loss
``-(reward - baseline) * log p(caption)`` is the teacher-forced cross-entropy of the sampled
tokens weighted by the advantage.

The result is an ordinary run folder (the decoder and tokenizer of ``--init``, the settings
under ``"scst"`` in ``config.json``), resumable per epoch like every run, with its own
``history.csv`` (mean reward, loss, dev BLEU-4 and CIDEr-D) and ``curves.png``.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from captioner.errors import CaptionerError
from captioner.formats.run_folder import SOURCE_KEYS
from captioner.inference.decoding import Hypothesis, State, StepFn, greedy_search
from captioner.train.scst_config import ScstConfig

__all__ = ["ScstConfig", "train_scst"]

SCST_HISTORY_FIELDS = ("epoch", "reward", "loss", "val_bleu4", "val_cider", "learning_rate",
                       "seconds")
CURVE_FILE = "curve.csv"  # reward and dev scores at every fraction of an epoch
CURVE_FIELDS = ("epoch", "reward", "val_bleu4", "val_cider")
# the recorded inputs SCST reads: those its config names (no mirrored view, for one)
SCST_SOURCES = tuple(k for k in SOURCE_KEYS if k in ScstConfig.__dataclass_fields__)


def _prepare(config: ScstConfig, resume: bool):
    """(run folder, its RunConfig, the effective ScstConfig); creates the folder from --init
    (its config with the SCST settings under ``training["scst"]``, its tokenizer, its weights
    as the starting point) unless resuming."""
    from captioner.formats.run_folder import (
        CONFIG_FILE,
        LAST_WEIGHTS,
        TOKENIZER_FILE,
        FileRef,
        RunConfig,
    )
    from captioner.model.checkpoints import WeightsExporter  # noqa: F401  (checked importable early)

    run, init = Path(config.out), Path(config.init)
    if resume:
        saved = RunConfig.load(run)
        paths = {k: _located(saved, k, run, getattr(config, k)) for k in SCST_SOURCES}
        settings = {**saved.training["scst"], **paths, "out": str(run), "epochs": config.epochs}
        return run, saved, ScstConfig(**settings)
    if config.samples < 2:
        raise CaptionerError("--samples must be at least 2 (each sample's baseline is the others)")
    if (run / CONFIG_FILE).exists():
        raise CaptionerError(f"{run} already holds a run; pass --resume or choose another --out")
    base = RunConfig.load(init)
    if base.members:
        raise CaptionerError(f"{init} is an ensemble of {len(base.members) + 1} decoders; --init "
                             "takes one run folder (e.g. one of the runs it was bundled from)")
    for key in SCST_SOURCES:
        setattr(config, key, _located(base, key, init, getattr(config, key)))
    start = _starting_weights(init, config.init_epoch)  # checked before the folder exists
    run.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(init / TOKENIZER_FILE, run / TOKENIZER_FILE)
    for name in base.grounding.values():  # the ImageNet head, family map and neighbour index
        shutil.copyfile(init / name, run / name)
    shutil.copyfile(start, run / LAST_WEIGHTS)  # the starting point, until epoch 1 replaces it
    settings = {k: v for k, v in dataclasses.asdict(config).items()
                if k not in (*SCST_SOURCES, "out")}
    settings["init"] = init.name
    saved = dataclasses.replace(
        base, training={**base.training, "scst": settings}, files={},  # not the init's files
        sources={k: FileRef.of(getattr(config, k), run) if getattr(config, k) else None
                 for k in SCST_SOURCES},
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    saved.save(run)
    return run, saved, config


def _starting_weights(init: Path, epoch: int | None) -> Path:
    """The weights SCST starts from: ``init``'s epoch-``epoch`` checkpoint, else its best
    (else last) weights."""
    from captioner.formats.run_folder import BEST_WEIGHTS, CHECKPOINTS_DIR, LAST_WEIGHTS

    if epoch is None:
        return init / BEST_WEIGHTS if (init / BEST_WEIGHTS).is_file() else init / LAST_WEIGHTS
    start = init / CHECKPOINTS_DIR / f"epoch-{epoch:03d}.weights.h5"
    if not start.is_file():
        kept = sorted(int(p.name[6:9]) for p in (init / CHECKPOINTS_DIR).glob("epoch-*.weights.h5"))
        raise CaptionerError(f"{start} does not exist; {init} keeps the epochs "
                             f"{', '.join(map(str, kept)) or 'none'} (train with "
                             "--keep-checkpoints N to keep more)")
    return start


def _located(saved, key: str, run: Path, given: str | None) -> str | None:
    """The input file ``key``: as given, else where ``run`` found it (required but val)."""
    ref = saved.sources.get(key)
    found = given or (ref.locate(run) if ref else None)
    if not found and key != "val_features":
        name = ref.name if ref else "it"
        raise CaptionerError(f"{run} was trained on {name}, which is not where it was; "
                             f"pass --{key.replace('_', '-')}")
    return str(Path(found).resolve()) if found else None


def _load_model(run: Path, saved, config: ScstConfig, steps_per_epoch: int):
    import keras

    from captioner.formats.run_folder import LAST_WEIGHTS
    from captioner.model.decoders import MaskedSparseCrossEntropy, build_decoder

    # No dropout and no attention regulariser while fine-tuning: the gradient is then taken
    # under the same policy that sampled the captions (sampling runs without dropout).
    config_ = saved.decoder.config
    model = build_decoder(saved.decoder.kind, **{
        **config_, **{k: v for k, v in _POLICY_OVERRIDES.items() if k in config_}})
    model.load_weights(run / LAST_WEIGHTS)
    warmup = int(config.warmup_epochs * steps_per_epoch)
    rate = config.learning_rate if not warmup else keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=1, alpha=1.0, warmup_target=config.learning_rate, warmup_steps=warmup)
    model.compile(
        optimizer=keras.optimizers.Adam(rate, clipnorm=config.clipnorm),
        loss=MaskedSparseCrossEntropy(0.0, reduction="sum_over_batch_size"),
    )
    return model


_POLICY_OVERRIDES = {"dropout": 0.0, "attention_reg": 0.0}


def advantages(rewards: np.ndarray) -> np.ndarray:
    """Reward minus the mean reward of the image's other samples; ``rewards`` is (B, K)."""
    k = rewards.shape[1]
    baseline = (rewards.sum(axis=1, keepdims=True) - rewards) / (k - 1)
    return rewards - baseline


def sequences(token_lists: list[tuple[int, ...]], finished: list[bool], width: int):
    """Teacher-forcing arrays for sampled captions: (tokens_in, tokens_out, mask), (N, T)."""
    from captioner.text.tokenizer import END, START

    rows = [[START, *t, *([END] if f else [])] for t, f in zip(token_lists, finished, strict=True)]
    steps = min(max(len(r) for r in rows) - 1, width)
    full = np.zeros((len(rows), steps + 1), dtype=np.int32)
    for i, r in enumerate(rows):
        full[i, : min(len(r), steps + 1)] = r[: steps + 1]
    tokens_in, tokens_out = full[:, :-1], full[:, 1:]
    return tokens_in, tokens_out, (tokens_out != 0).astype(np.float32)


class _Step:
    """One SCST update: sample, score, weight the log-likelihood by the advantage."""

    def __init__(self, model, tokenizer, scorer, config: ScstConfig):
        self.model, self.tokenizer, self.scorer, self.config = model, tokenizer, scorer, config
        self.max_length = tokenizer.max_length - 1
        self._captioner = None

    def captioner(self):
        """The sampling model over the live weights (rebuilt after every update on JAX)."""
        from captioner.train.monitor import live_captioner

        self._captioner = live_captioner(self._captioner, self.model, self.tokenizer)
        return self._captioner

    def __call__(self, names: list[str], feats: np.ndarray, rng: np.random.Generator):
        from captioner.text.tokenizer import END, PAD, START, UNK

        k = self.config.samples
        rep = np.repeat(feats, k, axis=0)  # (B*K, *F), image i's samples are rows i*K..i*K+K-1
        state, step = self.captioner().prepare(rep)
        hyps = sample_search(step, state, len(rep), START, END, self.max_length, rng,
                             banned_ids=(PAD, START, UNK), temperature=self.config.temperature,
                             top_k=self.config.top_k)
        texts = [self.tokenizer.decode(h.tokens) for h in hyps]
        rewards = np.array([self.scorer.score(n, texts[i * k:(i + 1) * k])
                            for i, n in enumerate(names)])  # (B, K)
        adv = advantages(rewards).reshape(-1)
        t_in, t_out, mask = sequences([h.tokens for h in hyps], [h.finished for h in hyps],
                                      self.max_length)
        loss = self.model.train_on_batch((rep, t_in), t_out, sample_weight=mask * adv[:, None])
        return float(rewards.mean()), float(np.asarray(loss).reshape(-1)[0])


def train_scst(config: ScstConfig, resume: bool = False, verbose: bool = True) -> Path:
    """Fine-tune ``config.init`` with self-critical training into ``config.out``."""
    from captioner.formats.run_folder import (
        BEST_WEIGHTS,
        CHECKPOINT,
        HISTORY,
        LAST_WEIGHTS,
        TOKENIZER_FILE,
        read_history,
        write_history,
    )
    from captioner.inference.captioner import Captioner
    from captioner.model.checkpoints import WeightsExporter, load_checkpoint, save_checkpoint
    from captioner.progress import progress
    from captioner.text.cider import CiderScorer
    from captioner.text.tokenizer import Tokenizer
    from captioner.train.batches import read_features
    from captioner.train.monitor import sample_scores, selection_score
    from captioner.train.training import _load_split, _val_sample

    run, saved, config = _prepare(config, resume)
    tokenizer = Tokenizer.load(run / TOKENIZER_FILE)
    exporter = WeightsExporter(saved.decoder.kind, saved.decoder.config)
    reader, caps = _load_split(config.captions, config.train_features, config.max_train_images)
    names = sorted(caps)
    model = _load_model(run, saved, config, -(-len(names) // config.batch_images))
    epoch, state = 0, {"best": -1.0}
    if resume and (run / CHECKPOINT).is_file():
        epoch, state = load_checkpoint(run / CHECKPOINT, model)
    table = read_features(reader, names)  # (N, *F) float32, all training images in memory
    scorer = CiderScorer(caps)
    step = _Step(model, tokenizer, scorer, config)
    view = SimpleNamespace(captions=config.captions, val_features=config.val_features,
                           val_bleu_images=config.val_images)
    val = _val_sample(view)[2]  # (features, references) of the dev images, or None
    dev_decoding = saved.decoding.replace(beam_size=config.val_beam_size, n_best=1)
    rows = read_history(run / HISTORY)
    curve = read_history(run / CURVE_FILE)
    if not curve and val is not None:  # the starting point: what the curve rises (or falls) from
        bleu, cider = sample_scores(Captioner(model, tokenizer), val, dev_decoding)
        curve = [{"epoch": 0.0, "reward": None, "val_bleu4": bleu, "val_cider": cider}]
        write_history(run / CURVE_FILE, curve, CURVE_FIELDS)
    while epoch < config.epochs:
        started, rng = time.time(), np.random.default_rng((config.seed, epoch))
        order = rng.permutation(len(names))
        rewards, losses = [], []
        batches = range(0, len(order), config.batch_images)
        marks = _marks(len(batches), config.evals_per_epoch)
        with progress(total=len(order), desc=f"scst epoch {epoch + 1}/{config.epochs}",
                      unit="img", enabled=verbose or None) as bar:
            for n, start in enumerate(batches, 1):
                idx = order[start:start + config.batch_images]
                reward, loss = step([names[i] for i in idx], table[idx], rng)
                rewards.append(reward)
                losses.append(loss)
                bar.update(len(idx))
                bar.set_postfix(reward=f"{np.mean(rewards[-20:]):.3f}")
                if n in marks and n != len(batches):
                    curve = _curve_point(curve, epoch + n / len(batches), rewards, marks[n],
                                         sample_scores(Captioner(model, tokenizer), val, dev_decoding))
                    write_history(run / CURVE_FILE, curve, CURVE_FIELDS)
        bleu, cider = sample_scores(Captioner(model, tokenizer), val, dev_decoding)
        epoch += 1
        curve = _curve_point([r for r in curve if r["epoch"] <= epoch], float(epoch), rewards,
                             marks[len(batches)], (bleu, cider))
        write_history(run / CURVE_FILE, curve, CURVE_FIELDS)
        rows = [r for r in rows if r["epoch"] < epoch] + [{
            "epoch": epoch, "reward": float(np.mean(rewards)), "loss": float(np.mean(losses)),
            "val_bleu4": bleu, "val_cider": cider, "learning_rate": config.learning_rate,
            "seconds": round(time.time() - started, 2)}]
        score = selection_score(config.select_on, bleu, cider)
        score = score if score is not None else float(np.mean(rewards))
        if score > state["best"]:
            state = {"best": score, "best_epoch": epoch}
            exporter.save(model, run / BEST_WEIGHTS)
        exporter.save(model, run / LAST_WEIGHTS)
        write_history(run / HISTORY, rows, SCST_HISTORY_FIELDS)
        _curves(rows, run)
        save_checkpoint(run / CHECKPOINT, model, epoch, state)
        if verbose:
            print(f"scst epoch {epoch}: reward {rows[-1]['reward']:.4f}, dev BLEU-4 "
                  f"{_pct(bleu)}, CIDEr-D {_pct(cider)}", flush=True)
    return run


def _marks(batches: int, evals: int) -> dict[int, int]:
    """{batch number after which the dev set is scored: the batch number of the previous mark}."""
    ends = sorted({max(1, round(batches * i / max(1, evals))) for i in range(1, max(1, evals) + 1)})
    return dict(zip(ends, [0, *ends[:-1]], strict=True))


def _curve_point(curve: list[dict], at: float, rewards: list[float], since: int,
                 scores: tuple[float | None, float | None]) -> list[dict]:
    """``curve`` with the point at epoch ``at`` (mean reward of the batches after ``since``)."""
    point = {"epoch": round(at, 4), "reward": float(np.mean(rewards[since:])),
             "val_bleu4": scores[0], "val_cider": scores[1]}
    return [r for r in curve if r["epoch"] < point["epoch"]] + [point]


def _curves(rows: list[dict], run: Path) -> None:
    from captioner.evaluation.figures import save_training_curves
    from captioner.formats.run_folder import CURVES

    try:
        save_training_curves(rows, run / CURVES)
    except OSError:
        pass


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


# Sampling captions from a decoder's distribution (the exploration of self-critical training).


def sample_search(
    step: StepFn,
    state: State,
    batch_size: int,
    start_id: int,
    end_id: int,
    max_length: int,
    rng: np.random.Generator,
    banned_ids: Sequence[int] = (),
    temperature: float = 1.0,
    top_k: int = 0,
) -> list[Hypothesis]:
    """One caption per row drawn from the model's distribution (for self-critical training).

    Each step samples the next token from ``softmax(log_probs / temperature)`` with banned ids
    removed, restricted to each row's ``top_k`` most likely tokens when ``top_k`` > 0; rows stop
    at the end token or after ``max_length`` tokens, like greedy search.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")

    def draw(log_probs: np.ndarray) -> np.ndarray:
        scaled = log_probs / temperature
        if 0 < top_k < scaled.shape[1]:
            kth = -np.partition(-scaled, top_k - 1, axis=1)[:, top_k - 1 : top_k]  # (R, 1)
            scaled = np.where(scaled >= kth, scaled, -np.inf)
        probs = np.exp(scaled - scaled.max(axis=1, keepdims=True))  # (R, V), banned ids 0
        cumulative = np.cumsum(probs, axis=1)
        draws = rng.random(len(log_probs)) * cumulative[:, -1]
        return np.minimum((cumulative < draws[:, None]).sum(axis=1), log_probs.shape[1] - 1)

    return greedy_search(step, state, batch_size, start_id, end_id, max_length,
                         banned_ids=banned_ids, choose=draw)

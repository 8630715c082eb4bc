"""Named presets: the one place where the pipeline's defaults live.

``captioner extract``, ``train`` and ``evaluate`` take ``--preset NAME``; every option left
unset comes from it, so running the three with defaults gives one consistent pipeline:

- ``classic``: the Flickr8k tutorial (Tasks 1-5): VGG16 ``fc2`` vectors, the merge decoder,
  greedy search;
- ``default``: the bundled model (``weights/default``, whose ``config.json`` names this
  preset): EfficientNet-Lite2 ``conv`` maps (9x9x1280), the attention decoder trained with a
  cosine schedule and label smoothing, selected on the whole dev split, beam search with
  length normalisation 0.7, no repeated word pair and grounding in the ImageNet head.

A preset's decoding is written into the run folders trained with it (``config.json``'s
``"decoding"``) and used for older folders that do not record theirs.

Changing the bundled model's recipe is a change of the ``default`` entry below. Standard
library only (the CLI reads it to print ``--help``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from captioner.errors import CaptionerError
from captioner.formats.decoding_config import DecodingConfig


@dataclass(frozen=True)
class Preset:
    """Encoder, feature layer, decoder, training settings and decoding of one pipeline."""

    name: str
    description: str
    encoder: str
    layer: str
    decoder: str
    training: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields
    decoding: DecodingConfig = field(default_factory=DecodingConfig)  # stored with its runs

    def summary(self) -> str:
        """One line for ``--help``: what the preset picks."""
        return f"{self.encoder} {self.layer} features, {self.decoder} decoder, {self.decoding.label}"


PRESETS: dict[str, Preset] = {
    "classic": Preset(
        "classic",
        "the Flickr8k tutorial pipeline (Tasks 1-5)",
        encoder="vgg16",
        layer="fc2",
        decoder="merge",
        training={"epochs": 20, "schedule": "constant", "patience": 5},
        decoding=DecodingConfig(beam_size=1),
    ),
    "default": Preset(
        "default",
        "the bundled model (weights/default)",
        encoder="efficientnet_lite2",
        layer="conv",
        decoder="attention",
        training={"epochs": 8, "schedule": "cosine", "warmup_epochs": 0.5,
                  "learning_rate": 2e-3, "label_smoothing": 0.1, "patience": 0,
                  "max_length": 22, "val_bleu_images": 1000, "val_beam_size": 3,
                  "train_score_images": 500,
                  "select_on": "bleu4+cider"},
        # chosen on dev (docs/RESULTS.md); grounding needs the run's ImageNet head, which
        # training attaches to EfficientNet-Lite runs (captioner.inference.grounding)
        decoding=DecodingConfig(alpha=0.7, block_ngram=2, grounding=2.0, grounding_boost=3.0),
    ),
}
DEFAULT_PRESET = "default"


def get_preset(name: str | None) -> Preset:
    """The preset called ``name`` (None: :data:`DEFAULT_PRESET`)."""
    name = name or DEFAULT_PRESET
    if name not in PRESETS:
        raise CaptionerError(f"unknown preset '{name}'; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def preset_help() -> str:
    """The ``--preset`` help text, listing every preset."""
    listed = "; ".join(f"{p.name}: {p.description}, {p.summary()}" for p in PRESETS.values())
    return f"where unset options take their defaults from ({listed}). Default: {DEFAULT_PRESET}"


PRESET_NOTE = (
    f"Options left unset take their values from --preset (default "
    f"'{DEFAULT_PRESET}': {PRESETS[DEFAULT_PRESET].description})."
)


def add_preset_option(parser) -> None:
    """Add ``--preset`` to an argparse parser and say so in its description."""
    parser.description = f"{parser.description or ''}\n\n{PRESET_NOTE}".strip()
    parser.add_argument(
        "--preset", choices=list(PRESETS), default=DEFAULT_PRESET, help=preset_help()
    )

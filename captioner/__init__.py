"""captioner: image captioning with Keras 3.

Pipeline: images -> encoder features (HDF5 cache) -> teacher-forcing batches -> LSTM decoder
-> captions (greedy / beam search) -> scores -> report.

Importing the package is cheap: Keras and TensorFlow are only imported by the modules that need
them, and nothing requires TensorFlow when ``KERAS_BACKEND`` is ``jax`` or ``torch``.
"""

__version__ = "0.1.0"

# The public API, imported on first use
# (``import captioner`` stays light): name -> "module" or "module:attribute".
_PUBLIC = {
    "Captioner": "captioner.inference.captioner:Captioner",
    "load_captioner": "captioner.inference.loader:load_captioner",
    "DecodingConfig": "captioner.formats.decoding_config:DecodingConfig",
    "figures": "captioner.evaluation.figures",
}


def lazy_exports(package: str, table: dict[str, str]):
    """A module ``__getattr__`` that imports ``table``'s names (``"module"`` or
    ``"module:attribute"``) on first use, so importing ``package`` stays light."""

    def __getattr__(name: str):
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        import importlib

        module, _, attribute = table[name].partition(":")
        found = importlib.import_module(module)
        return getattr(found, attribute) if attribute else found

    return __getattr__


__getattr__ = lazy_exports(__name__, _PUBLIC)

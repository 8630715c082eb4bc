"""From a trained model to captions: the one loader (``loader.load_captioner``),
``Captioner`` and its one ``caption`` call (``captioner``), greedy and beam search
(``decoding``), ``caption --out`` files (``caption_lines``) and the ONNX runtime and export
(``onnx_runtime``, ``onnx_export``)."""

# The README's ``from captioner.inference import Captioner`` keeps working, imported on first use
# (``import captioner`` stays light): name -> "module" or "module:attribute".
_PUBLIC = {
    "Captioner": "captioner.inference.captioner:Captioner",
    "load_captioner": "captioner.inference.loader:load_captioner",
}


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    module, _, attribute = _PUBLIC[name].partition(":")
    found = importlib.import_module(module)
    return getattr(found, attribute) if attribute else found

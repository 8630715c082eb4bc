"""From a trained model to captions: the one loader (``loader.load_captioner``),
``Captioner`` and its one ``caption`` call (``captioner``), greedy and beam search
(``decoding``), what decodes beside the decoder — object grounding in the encoder's ImageNet
head (``grounding``) and consensus reranking with the training images' captions
(``consensus``) —, ``caption --out`` files (``caption_lines``) and the ONNX runtime and export
(``onnx_runtime``, ``onnx_export``)."""

from captioner import lazy_exports

# The README's ``from captioner.inference import Captioner`` keeps working, imported on first use
# (``import captioner`` stays light): name -> "module" or "module:attribute".
_PUBLIC = {
    "Captioner": "captioner.inference.captioner:Captioner",
    "load_captioner": "captioner.inference.loader:load_captioner",
}


__getattr__ = lazy_exports(__name__, _PUBLIC)

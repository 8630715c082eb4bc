"""captioner: image captioning with Keras 3.

Pipeline: images -> encoder features (HDF5 cache) -> teacher-forcing batches -> LSTM decoder
-> captions (greedy / beam search) -> scores -> report.

Importing the package is cheap: Keras and TensorFlow are only imported by the modules that need
them, and nothing requires TensorFlow when ``KERAS_BACKEND`` is ``jax`` or ``torch``.
"""

__version__ = "0.1.0"


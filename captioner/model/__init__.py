"""The trainable decoder: the decoder registry and Keras models (``decoders``) and their
checkpoints (``checkpoints``)."""

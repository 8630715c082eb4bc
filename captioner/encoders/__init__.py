"""Images in, encoder networks out: photo decoding and resizing (``images``), the
encoder specs (``specs``: VGG, ResNet, MobileNet, EfficientNet-Lite built from Keras layers),
ImageNet preprocessing (``preprocessing``), weight files and where a run's encoder weights
come from (``weight_files``, ``weights_source``, ``torch_weights``)."""

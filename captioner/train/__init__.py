"""Training a decoder: ``training.train`` (resumable), its teacher-forcing batches
(``batches``), the per-epoch monitor with dev scores (``monitor``), data-parallel training
(``distributed``) and self-critical fine-tuning (``scst``, ``scst_config``)."""

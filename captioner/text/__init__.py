"""Captions as text: caption files of every format (``captions``, ``caption_file``,
``coco``, ``karpathy``), cleaning rules (``cleaning``) and the tokenizer (``tokenizer``)."""

"""Captions as text: caption files of every format (``captions``, ``caption_file``,
``coco``, ``karpathy``), cleaning rules (``cleaning``), the tokenizer (``tokenizer``) and
CIDEr's n-gram vectors (``cider``)."""

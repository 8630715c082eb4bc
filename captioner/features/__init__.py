"""Encoder features on disk: the HDF5 feature cache (``cache`` reads, ``cache_writer``
writes and resumes, ``checksums`` verifies rows) and the one image -> features pipeline
(``extraction``, ``extract_plan``: the rows a run must fill, for either engine)."""

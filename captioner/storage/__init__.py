"""Files on disk: atomic writes, JSON and sha256 (``files``), temporary names and
their clean-up (``temp_files``), and machine faults (full disk, read-only, ...) told in one
line with free-space checks (``faults``)."""

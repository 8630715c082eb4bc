"""``captioner fit``: checks and splits (``input_checks``), then extract -> train ->
evaluate -> report as one resumable pipeline (``pipeline``)."""

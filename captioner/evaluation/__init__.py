"""Scores and what shows them: BLEU, CIDEr-D, ROUGE-L (``metrics``), METEOR 1.5
(``meteor``), ``evaluate`` (a run against reference captions), figures (attention maps,
curves) and report.json / .md / .html (``report``, ``templates/``)."""

"""The formats a run is made of, owned here and read everywhere else: the run folder
(``run_folder``: config.json, history.csv, migration), its schema and cross-file checks
(``run_checks``), the presets, the decoding settings stored with a model
(``decoding_config``) and the keys of the JSON lines the commands print (``json_lines``)."""

"""The `videonsa_needles` lmms-eval task folder (a YAML and the `utils.py` its `!function` entries name)."""

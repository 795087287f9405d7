"""The command-line tools whose code still lives in the repository root (``infer.py``, ``evaluate.py``).

``infer.py`` and ``evaluate.py`` here are symbolic links to those scripts, so that the wheel carries them (as
ordinary files) and the ``d3-infer`` / ``d3-evaluate`` commands run exactly the code ``python infer.py`` runs.
Nothing imports this package except :mod:`d3.cli`.
"""

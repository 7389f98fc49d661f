"""Reports: per stage (``stage.py``), per run (``comparison.py`` with ``plots.py``), run vs run (``compare.py``), the release gate (``gate.py``)."""

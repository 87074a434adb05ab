"""Measuring, calibrating and distilling attention (the catalog family ``analysis``).

One module per paper; every catalog id of the family is importable from here under its name.
"""

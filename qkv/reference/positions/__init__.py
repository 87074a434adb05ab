"""Where tokens are: positional encodings and position-only attention (the catalog family ``positions``).

One module per paper; every catalog id of the family is importable from here under its name.
"""

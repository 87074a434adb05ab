"""Other score functions and shapes of attention (the catalog family ``forms``).

One module per paper; every catalog id of the family is importable from here under its name.
"""

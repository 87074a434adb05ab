"""Local and routed attention over sequences, images and volumes (the catalog family ``local``).

One module per paper; every catalog id of the family is importable from here under its name.
"""

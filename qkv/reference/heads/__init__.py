"""How heads share and shape keys and values (the catalog family ``heads``).

One module per paper; every catalog id of the family is importable from here under its name.
"""

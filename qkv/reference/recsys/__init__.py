"""Attention in recommender systems and prompt pools (the catalog family ``recsys``).

One module per paper; every catalog id of the family is importable from here under its name.
"""

"""The readable NumPy reference: one module per family of the catalog.

Every backend is tested against these functions evaluated in float64.
"""

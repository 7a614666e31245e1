"""The ground floor: the shard contract and small helpers every other part shares.

Nothing here imports another babelcap package; heavy libraries (torch) are imported inside
the functions that need them.
"""

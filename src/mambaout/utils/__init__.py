"""The lowest layer: atomic file writes, input bounds, optional imports and the distributed facade.

Nothing here imports another part of the package.
"""

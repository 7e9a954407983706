"""The lowest layer (files, bounds, devices, checks, YAML, optional imports, DDP): it imports no other layer."""

"""The package internals dense prediction reuses, imported in this one place (repoint them here if they move).

Everything else in `mambaout.dense` imports the public API (`mambaout.create_model`, `save_weights`,
`read_checkpoint`) or these names.
"""

from mambaout import distributed as dist
from mambaout.files import atomic_torch_save, atomic_write_text, check_writable
from mambaout.image import load_image
from mambaout.limits import resolve_device
from mambaout.optim import param_groups
from mambaout.optional import MissingDependency, require
from mambaout.runfolder import (
    check_output_free,
    lock_folder,
    remove_stale_temporaries,
    rng_state,
    seed_all,
    set_rng_state,
)

__all__ = [
    "MissingDependency",
    "atomic_torch_save",
    "atomic_write_text",
    "check_output_free",
    "check_writable",
    "dist",
    "load_image",
    "lock_folder",
    "param_groups",
    "remove_stale_temporaries",
    "require",
    "resolve_device",
    "rng_state",
    "seed_all",
    "set_rng_state",
]

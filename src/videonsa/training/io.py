"""The atomic file writers' former home: they live in `videonsa.files` now; re-exported for code that still
imports them from here."""

from videonsa.files import (
    apply_umask_modes,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    current_umask,
    staging_folder,
)

__all__ = [
    "apply_umask_modes",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "current_umask",
    "staging_folder",
]

"""Files stt writes for a team to share (the feature cache, the synthetic datasets): reading the umask,
so that what tempfile creates private (0600 files, 0700 folders) can be given the mode a plain open() or
mkdir() would have. A module of its own, importing nothing heavy, so every writer can use it."""
from __future__ import annotations

import os


def current_umask() -> int:
    """The process's file-mode creation mask, e.g. 0o022."""
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask

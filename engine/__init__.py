"""Crucible's checkpoint/restore engine (`ckpt`).

Runs as root on the guest's own python3: standard library and ctypes only.
"""

__version__ = "0.1.0"
# Bumped whenever a record layout in the image changes; an image of another
# format version is refused, never guessed at.
# 5: core.json attrs (engine/procattrs.py: an older engine would drop them);
# 4: tree.json "share" (an older engine would give a CLONE_FILES member an empty fd table);
# 3: core.json threads + threads-xstate.bin (an older engine would restore the leader alone);
# 2: signals, sched, posix_timers, seccomp
FORMAT_VERSION = 5

from .bundle import install as _install_bundle   # noqa: E402 - the engine's modules from one file (issue 15)

_install_bundle(__path__[0], __name__)
del _install_bundle

"""Crucible's checkpoint/restore engine (`ckpt`).

Runs as root on the guest's own python3: standard library and ctypes only.
"""

__version__ = "0.1.0"
# Bumped whenever a record layout in the image changes; an image of another
# format version is refused, never guessed at.
FORMAT_VERSION = 2   # 2: core.json signals, sched, posix_timers, seccomp (required at restore)

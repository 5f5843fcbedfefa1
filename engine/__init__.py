"""Crucible's checkpoint/restore engine (`ckpt`).

Runs as root on the guest's own python3: standard library and ctypes only.
"""

__version__ = "0.1.0"
# Bumped whenever a record layout in the image changes; an image of another
# format version is refused, never guessed at (image.READ_FORMATS: the
# older formats read, each because it is known exactly what differs).
# 5: pages files carry a CRC-32 per 1 MiB block instead of a sha256 (engine/pagecrc.py;
#    format 4 images are still read: image.READ_FORMATS);
# 4: tree.json "share" (an older engine would give a CLONE_FILES member an empty fd table);
# 3: core.json threads + threads-xstate.bin (an older engine would restore the leader alone);
# 2: signals, sched, posix_timers, seccomp
FORMAT_VERSION = 5

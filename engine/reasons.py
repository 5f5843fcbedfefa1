"""The stable reason codes of refusals. Part of the interface: never reuse or
rename a code; add new ones at the end of their group. The README lists them
(tests check the README and this table agree)."""

REASONS = {
    # process-level
    "no-such-process": "the PID does not exist (or exited while being frozen)",
    "kernel-thread": "the PID is a kernel thread, which has no user state to save",
    "zombie": "the target is a zombie: it has exited and only waits to be reaped",
    "ptraced": "the target is already traced by another process (a debugger, strace, another ckpt)",
    "threads": "the target has more than one thread; multi-threaded processes are not supported yet",
    "process-tree": "the target has children; process trees are not supported yet",
    "self": "ckpt will not checkpoint itself or its own ancestors",
    "pid-in-use": "restore needs the dumped PID and another process holds it",
    "kernel-missing": "the running kernel lacks a feature the engine needs (named in the detail)",
    "capability": "ckpt lacks a capability it needs (named in the detail)",
    "arch-mismatch": "the image was made on another CPU architecture",
    "cpu-mismatch": "the image's saved FPU/xstate layout does not fit this CPU",
    "image-invalid": "the image is damaged, tampered with, incomplete or of another format version",
    "unsupported-mapping": "a memory mapping of a kind the engine cannot restore (named in the detail)",
    "unsupported-state": "process state the engine cannot save faithfully (named in the detail)",
    "unsupported-arch": "the engine has no support for this CPU architecture yet",
    # files
    "file-missing": "a file the process had open (or mapped) no longer exists at its path",
    "file-changed": "a file the process had open (or mapped) is not the same file any more",
    "unlinked-too-large": "a deleted-but-open file is larger than --ghost-limit",
    "device": "a character or block device other than the known-safe ones",
    "pseudo-file": "an open (or mapped) file on a kernel pseudo filesystem (proc, sysfs, nsfs, cgroup, ...)",
    "unlinked-unrestorable": "a deleted-but-open file could not be recreated where it lived",
    # pipes and fifos
    "fifo-missing": "the named fifo no longer exists at its path",
    "pipe-peer-outside": "the other end of a pipe is held by a process outside the dump",
    # notification
    "inotify-unresolvable": "an inotify watch's inode cannot be found again by path",
    "inotify-pending": "an inotify instance has unread events; restoring would drop them",
    "dnotify": "a directory fd carries a dnotify (F_NOTIFY) registration",
    "fanotify": "fanotify instances are not supported",
    # sockets
    "socket": "a socket the engine cannot restore exactly (family, type and state in the detail)",
    # everything else
    "unsupported-fd": "an fd of a kind with no handler (deny by default)",
}

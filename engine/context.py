"""What the core hands to fd handlers (and to the file-identity helpers)."""

from __future__ import annotations

import os

from .plainclass import dataclass, field
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Any, Dict, Optional

DEFAULT_GHOST_LIMIT = 64 << 20       # bytes of data (holes do not count)
VALIDATION_MODES = ("strict", "digest", "size", "none")


def boot_id() -> str:
    """Identifies this boot of this kernel: same boot id = same node, where
    dev+inode numbers still name the same files."""
    fd = os.open("/proc/sys/kernel/random/boot_id", os.O_RDONLY | os.O_CLOEXEC)
    try:        # os.read, not open(): no text file object (half the syscalls)
        return os.read(fd, 256).decode().strip()
    finally:
        os.close(fd)


@dataclass
class Options:
    leave_running: bool = False
    ghost_limit: int = DEFAULT_GHOST_LIMIT
    file_validation: str = "digest"   # strict | digest | size | none
    debug: bool = False
    shell_job: bool = False           # dump: a pty slave whose master is outside is saved (engine/fds/tty.py)
    tty: str = ""                     # restore: the terminal such fds are reopened on ("inherit": stdin's)
    probe: bool = True                # check: may write to a target's eventfd to find EFD_SEMAPHORE (< 6.6);
                                      # a survey of a whole machine does not (engine/fds/_efdprobe.py)


@dataclass
class DumpContext:
    pid: int
    options: Options
    image: Any = None                 # engine.image.ImageWriter; None for `ckpt check`
    task: Any = None                  # the frozen, seized target: task.syscall(nr, *args)
    threads: Any = ()                 # the other frozen threads (engine/threads.py)
    shared: Dict[str, Any] = field(default_factory=dict)   # state shared across fds (pipes by inode, ...)
    all_fds: Dict[int, Any] = field(default_factory=dict)  # fd number -> FdInfo, for peer lookups
    boot_id: str = ""
    tree_root: Optional[int] = None   # dumping a process tree (engine/tree.py): its root
    tree_pids: frozenset = frozenset()   # every member of that tree (not "outside" for peer scans)

    @property
    def dry_run(self) -> bool:
        return self.image is None


@dataclass
class RestoreContext:
    options: Options
    image: Any                        # engine.image.ImageReader (verified)
    same_node: bool                   # the image was made in this boot of this machine
    shared: Dict[str, Any] = field(default_factory=dict)
    records: Optional[list] = None    # every fd record, for peer lookups
    pid: Optional[int] = None         # the PID being restored
    tree_records: Optional[list] = None   # every member's fd records (engine/tree_restore.py)
    tree_pids: frozenset = frozenset()    # every member's PID, zombies too (what a pidfd may name)

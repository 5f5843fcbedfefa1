"""Which filesystem a file lives on, from statfs(2)'s f_type magic
(include/uapi/linux/magic.h).

Why: an fd's st_mode alone does not say whether reopening it by path gives
the same thing back. /proc, /sys, cgroup, nsfs, mqueue and friends show
plain S_IFREG files whose "contents" are kernel state generated per open
(or per process, or per namespace); a reopen by path gives another object,
or nothing. Those are classified by the filesystem, not by the mode, and
refused as `pseudo-file` (files with a path) or `unsupported-fd` (handles
with no path: pidfs, anon inodes). statfs() on /proc/PID/fd/N (or
map_files/...) follows the magic link to the open file's own superblock.
"""

from __future__ import annotations

import ctypes
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Optional

PROC = 0x9fa0
# Filesystems whose files are views of kernel state: a path on them does
# not name stable bytes that a reopen (on this machine or another) gives
# back. Mode says S_IFREG or S_IFDIR for most of them.
PSEUDO = {
    0x9fa0: "proc",
    0x62656572: "sysfs",
    0x6e736673: "nsfs",
    0x27e0eb: "cgroup",
    0x63677270: "cgroup2",
    0x64626720: "debugfs",
    0x74726163: "tracefs",
    0x73636673: "securityfs",
    0xcafe4a11: "bpf",
    0x62656570: "configfs",
    0x6165676c: "pstore",
    0xde5e81e4: "efivarfs",
    0x65735543: "fusectl",
    0x958458f6: "hugetlbfs",      # huge pages: a ghost recreated on tmpfs would not be one
    0x19800202: "mqueue",         # mq_open() fds are S_IFREG with a "/name" link
    0x0187: "autofs",
    0x42494e4d: "binfmt_misc",
    0xf97cff8c: "selinuxfs",
    0x43415d53: "smackfs",
    0x7655821: "resctrl",
    0x67596969: "rpc_pipefs",
    0x6e667364: "nfsd",
    0xabba1974: "xenfs",
    0x9fa2: "usbdevfs",
    0x1cd1: "devpts",             # only its directory: the pty nodes are devices
}

# Kernel handles that are not files at all: no path to reopen, no contents.
HANDLES = {
    0x09041934: "anon_inodefs",
    0x50494446: "pidfs",          # pidfd_open(); S_IFREG on some kernels
    0x5345434d: "secretmem",      # memfd_secret()
    0x444d4142: "dmabuf",
    0x62646576: "bdev",
}

# The ones handled elsewhere by their own kinds (named for messages only).
OTHER = {
    0x01021994: "tmpfs",
    0x50495045: "pipefs",
    0x534f434b: "sockfs",
    0xef53: "ext4",
    0x58465342: "xfs",
    0x9123683e: "btrfs",
    0x794c7630: "overlayfs",
}


class _Statfs(ctypes.Structure):
    # struct statfs on 64-bit Linux: f_type is the first long; the rest
    # (15 words) is never read here but must be there for the kernel.
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_long * 15)]


_libc = ctypes.CDLL(None, use_errno=True)


def magic(path: str) -> Optional[int]:
    """statfs(path).f_type, or None when it cannot be read."""
    buf = _Statfs()
    if _libc.statfs(path.encode(), ctypes.byref(buf)) != 0:
        return None
    return buf.f_type & 0xffffffff


def name(m: Optional[int]) -> str:
    if m is None:
        return "unknown"
    return PSEUDO.get(m) or HANDLES.get(m) or OTHER.get(m) or f"fs {m:#x}"


def pseudo(m: Optional[int]) -> bool:
    return m in PSEUDO


def handle(m: Optional[int]) -> bool:
    return m in HANDLES

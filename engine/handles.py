"""File handles (name_to_handle_at / open_by_handle_at) through ctypes.

Used to find a file again from the kernel's own handle for it: a surviving
hard link of a file whose opened name was unlinked, or the inode an inotify
watch is on (its fdinfo carries the handle). Needs CAP_DAC_READ_SEARCH.
"""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
AT_SYMLINK_FOLLOW = 0x400
AT_EMPTY_PATH = 0x1000
MAX_HANDLE_SZ = 128


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ)]


def _err(what: str, path: str = "") -> OSError:
    e = ctypes.get_errno()
    return OSError(e, f"{what}: {os.strerror(e)}", path or None)


def name_to_handle(path: str, follow: bool = True):
    """(handle_type, handle_bytes, mount_id) for the file at `path`."""
    fh = _FileHandle()
    fh.handle_bytes = MAX_HANDLE_SZ
    mount_id = ctypes.c_int()
    flags = AT_SYMLINK_FOLLOW if follow else 0
    if _libc.name_to_handle_at(AT_FDCWD, os.fsencode(path), ctypes.byref(fh), ctypes.byref(mount_id), flags) != 0:
        raise _err("name_to_handle_at", path)
    return fh.handle_type, bytes(fh.f_handle[:fh.handle_bytes]), mount_id.value


def open_by_handle(mount_fd: int, handle_type: int, handle: bytes, flags: int = os.O_PATH) -> int:
    """An fd on the file the handle names, opened relative to `mount_fd`'s mount."""
    fh = _FileHandle()
    fh.handle_bytes = len(handle)
    fh.handle_type = handle_type
    ctypes.memmove(fh.f_handle, handle, len(handle))
    fd = _libc.open_by_handle_at(mount_fd, ctypes.byref(fh), flags | os.O_CLOEXEC)
    if fd < 0:
        raise _err("open_by_handle_at")
    return fd


def reconnect_path(open_path: str) -> str:
    """The path the kernel reports for the file behind `open_path` when it is
    reached through its handle rather than through the opened dentry: for a
    file with another hard link, that may be the surviving name."""
    htype, handle, _ = name_to_handle(open_path)
    mfd = os.open(open_path, os.O_RDONLY | os.O_CLOEXEC)   # fdget() rejects O_PATH fds here
    try:
        fd = open_by_handle(mfd, htype, handle)
    finally:
        os.close(mfd)
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)

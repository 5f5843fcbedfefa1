"""Test helper: an FdInfo for a live fd, built the way the core builds it."""

from __future__ import annotations

import os

from engine.fds import FdInfo


def fdinfo_of(pid: int, fd: int) -> FdInfo:
    path = f"/proc/{pid}/fd/{fd}"
    st = os.stat(path)
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        text = f.read()
    kv = {}
    for line in text.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            kv.setdefault(k.strip(), v.strip())
    return FdInfo(pid=pid, fd=fd, link=os.readlink(path), mode=st.st_mode, dev=st.st_dev, ino=st.st_ino,
                  nlink=st.st_nlink, size=st.st_size, rdev=st.st_rdev, pos=int(kv.get("pos", 0)),
                  flags=int(kv.get("flags", "0"), 8), mnt_id=int(kv.get("mnt_id", 0)),
                  fdinfo=kv, fdinfo_text=text, stat=st)

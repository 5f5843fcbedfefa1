"""Target for tests/test_fds_eventfd_probe.py: eventfds of every shape at
fds 500.., optionally a child holding the same ones (fork), and on SIGUSR1
a report of each eventfd: its fdinfo count and flags, and - when the file
`consume` exists in the working directory - what successive non-blocking
reads return (destructive: done once, after the restore).

argv: WORKDIR SPEC_JSON [--child]
SPEC_JSON: [[fd, initial count, semaphore, nonblock], ...]
fd 520: an epoll with every count-0 eventfd, EPOLLIN|EPOLLET; the report
says which fds epoll_wait(0) returns. The parent has a thread blocked in
read(2) on each blocking count-0 eventfd; the report says what each read.
"""

import json
import os
import select
import signal
import struct
import sys
import threading
import time

work, spec = sys.argv[1], json.loads(sys.argv[2])
os.chdir(work)
for fd, count, sem, nb in spec:
    e = os.eventfd(0, (os.EFD_SEMAPHORE if sem else 0) | (os.EFD_NONBLOCK if nb else 0))
    if count:
        os.write(e, struct.pack("Q", count))
    os.dup2(e, fd, inheritable=False)
    os.close(e)
# Every eventfd at count 0 in one epoll, edge-triggered for EPOLLIN (not
# ready: an edge the probe's write made would be reported by epoll_wait).
ep = select.epoll()
for fd, count, _, _ in spec:
    if not count:
        ep.register(fd, select.EPOLLIN | select.EPOLLET)
os.dup2(ep.fileno(), 520, inheritable=False)
ep.close()


def report(who: str) -> None:
    out = {"thread_reads": {str(fd): list(v) for fd, v in thread_reads.items()}}
    ep = select.epoll.fromfd(os.dup(520))
    try:
        out["epoll"] = sorted(fd for fd, _ in ep.poll(0))
    finally:
        ep.close()
    for fd, _, _, _ in spec:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            kv = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
        got = []
        if os.path.exists("consume"):
            for _ in range(12):          # a non-blocking read whatever the file's O_NONBLOCK
                buf = bytearray(8)
                try:
                    os.preadv(fd, [buf], -1, os.RWF_NOWAIT)
                except BlockingIOError:
                    break
                got.append(struct.unpack("Q", bytes(buf))[0])
        out[str(fd)] = {"count": int(kv["eventfd-count"].strip(), 16), "flags": int(kv["flags"].strip(), 8),
                        "reads": got}
    with open(f"{who}.tmp", "w") as f:
        json.dump(out, f)
    os.rename(f"{who}.tmp", f"{who}.json")


def reader(fd: int) -> None:
    while True:
        thread_reads[fd].append(struct.unpack("Q", os.read(fd, 8))[0])


thread_reads = {}
role = "parent"
kid = 0
if "--child" in sys.argv:
    kid = os.fork()
    if kid == 0:
        role = "child"
signal.signal(signal.SIGUSR1, lambda *_: report(role))
if role == "child":
    open("child.ready", "w").close()
else:
    while kid and not os.path.exists("child.ready"):
        time.sleep(0.01)
    # A thread blocked in read(2) on each blocking eventfd at count 0: the
    # probe must not feed it (the freeze took it out of the read; it reads
    # again once let go, and must find the count it left).
    tids = []
    for fd, count, _, nb in spec:
        if not count and not nb:
            thread_reads[fd] = []
            t = threading.Thread(target=reader, args=(fd,), daemon=True)
            t.start()
            tids.append(t.native_id)

    def blocked(tid):
        with open(f"/proc/self/task/{tid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "S"
    while not all(blocked(t) for t in tids):
        time.sleep(0.01)
    with open("ready.tmp", "w") as f:
        json.dump({"child": kid}, f)
    os.rename("ready.tmp", "ready")
while True:
    time.sleep(1)

"""A Python program with a thread pool (tests/test_engine_threads.py).

argv[1]: output file. The main thread submits job n = 1, 2, ... to a
4-worker ThreadPoolExecutor, a few at a time, and writes "n digest worker"
for each result in order: digest is sha256 chained over every earlier
result (a gap, a repeat or a lost update breaks the chain); worker is the
native thread id that ran it. Each worker also keeps its own count in a
threading.local and checks it against a shared table at every job.
"""

import hashlib
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

out = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
local = threading.local()
counts = {}
lock = threading.Lock()


def job(n: int) -> str:
    me = threading.get_native_id()
    local.count = getattr(local, "count", 0) + 1
    with lock:
        counts[me] = counts.get(me, 0) + 1
        if counts[me] != local.count:
            return f"BAD {me}"
    h = hashlib.sha256(str(n).encode())
    for _ in range(200):
        h = hashlib.sha256(h.digest())
    time.sleep(0.005)
    return f"{h.hexdigest()[:12]} {me}"


chain = hashlib.sha256(b"pool")
n = 0
with ThreadPoolExecutor(max_workers=4) as pool:
    while True:
        batch = [pool.submit(job, n + i + 1) for i in range(4)]
        for f in batch:
            n += 1
            res = f.result()
            chain.update(res.split()[0].encode())
            os.write(out, f"{n} {chain.hexdigest()[:12]} {res}\n".encode())
        time.sleep(0.01)

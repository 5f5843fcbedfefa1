"""CPython test target for the engine core.

usage: pyworker.py OUT IN
Step n (from 1): sets byte (n * 7919) % SIZE of a 1 MiB bytearray to n & 255,
hashes the whole array, reads the next byte of IN, appends
"n byte sha256-prefix\\n" to OUT, sleeps 5 ms. The test replays the same
steps to check every line, so nothing is taken on the engine's word.
SIGUSR1 appends "usr1 n".
"""

import hashlib
import os
import signal
import sys
import time

SIZE = 1 << 20


def main() -> None:
    out = open(sys.argv[1], "w", buffering=1)
    inp = open(sys.argv[2], "rb", buffering=0)
    buf = bytearray(i % 251 for i in range(SIZE))
    flag = []
    signal.signal(signal.SIGUSR1, lambda s, f: flag.append(1))
    n = 0
    while True:
        n += 1
        buf[(n * 7919) % SIZE] = n & 255
        digest = hashlib.sha256(buf).hexdigest()[:16]
        b = inp.read(1)
        out.write(f"{n} {b[0] if b else 0} {digest}\n")
        if flag:
            flag.clear()
            out.write(f"usr1 {n}\n")
        time.sleep(0.005)


if __name__ == "__main__":
    main()

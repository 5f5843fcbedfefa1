"""``python3 -m harness bench [--out bench/results.json]``"""

import sys

from .bench import main

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "bench":
        print("usage: python3 -m harness bench [--out FILE] [--workers N] [--skip-corpus]", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[2:]))

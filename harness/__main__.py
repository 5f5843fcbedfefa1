"""``python3 -m harness bench [--out bench/results.json]`` (reset and corpus
times) and ``python3 -m harness compare`` (ckpt against criu in one guest)."""

import sys

if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "bench":
        from .bench import main
        sys.exit(main(sys.argv[2:]))
    if len(sys.argv) >= 2 and sys.argv[1] == "compare":
        from .compare_bench import main
        sys.exit(main(sys.argv[2:]))
    print("usage: python3 -m harness bench [--out FILE] [--workers N] [--skip-corpus]\n"
          "       python3 -m harness compare [--out FILE] [--distro D] [--sizes 1,64] [--host]", file=sys.stderr)
    sys.exit(2)

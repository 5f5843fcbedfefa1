import gc
import sys

gc.set_threshold(100_000, 10, 10)    # before the imports too (engine/cli.py quiet_collector, YOUNG, says why)

from .cli import main, leave  # noqa: E402

leave(main())

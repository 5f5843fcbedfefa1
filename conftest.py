"""Root conftest: loads Crucible's scenario plugin (harness/pytest_plugin.py).

Every ``scenarios/**/*.yaml`` is a test run in a guest; ``--target local``
runs them on this host. Options: --arch, --engine (twice to compare),
--accel, --keep-guest, --guest-timeout-scale, --target.
"""

pytest_plugins = ["harness.pytest_plugin"]

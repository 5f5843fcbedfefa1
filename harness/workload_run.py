"""The exec'd workload's script: ``python3 -S workload_run.py run SPEC MARK``
(workload.spawn) runs ``workload.main`` with workload imported as a module.

Runs in the guest (stdlib only, Python >= 3.9). python3 compiles the script
it is given from source at every start and loads only imported modules from
their cached bytecode (the guest's files are compiled once, before the
golden snapshot): workload.py as the script cost each workload start ~16 ms
of compiling on the host, about ten times that under TCG. Nothing else
here: this file is compiled at every start.
"""

import sys

import workload

if __name__ == "__main__":
    sys.exit(workload.main(sys.argv[1:]))

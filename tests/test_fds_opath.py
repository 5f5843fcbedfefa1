"""O_PATH fds (a location without access: open(2) O_PATH, as CRIU's zdtm
opath_file holds one): restored as O_PATH fds on the same file, through a
whole dump and restore of a real process. Nothing else was ever tested
with one, and a dump step that asked an O_PATH fd for its F_SETOWN owner
(EBADF: it can have none) failed every dump of such a process."""

import os

from engine_core_support import procs, start_ready_script  # noqa: F401
from fds_support import dump_restore


def test_opath_fds_of_a_file_and_a_directory_come_back(procs, tmp_path):
    (tmp_path / "f").write_text("data")
    (tmp_path / "d").mkdir()
    setup = """
os.dup2(os.open("f", os.O_PATH), 500)
os.dup2(os.open("d", os.O_PATH | os.O_DIRECTORY), 501)
os.dup2(os.open("f", os.O_PATH | os.O_NOFOLLOW), 502, inheritable=False)
"""
    p = start_ready_script(procs, tmp_path, setup)
    before = {fd: os.readlink(f"/proc/{p.pid}/fd/{fd}") for fd in (500, 501, 502)}
    flags = {}
    for fd in (500, 501, 502):
        with open(f"/proc/{p.pid}/fdinfo/{fd}") as f:
            flags[fd] = next(line for line in f if line.startswith("flags:"))
    dump_restore(procs, p, str(tmp_path / "img"))
    for fd in (500, 501, 502):
        assert os.readlink(f"/proc/{p.pid}/fd/{fd}") == before[fd]
        with open(f"/proc/{p.pid}/fdinfo/{fd}") as f:
            assert next(line for line in f if line.startswith("flags:")) == flags[fd]
    assert int(flags[500].split()[1], 8) & os.O_PATH
    assert int(flags[502].split()[1], 8) & os.O_CLOEXEC

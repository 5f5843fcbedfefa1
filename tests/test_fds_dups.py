"""_dups: fds grouped by open file description with kcmp(KCMP_FILE)."""

from __future__ import annotations


from engine.fds._dups import group_by_ofd, leader_map

from fds_support import Target, all_fds

SETUP = """
r, w = os.pipe()
for n in (500, 503, 507): os.dup2(r, n)
os.dup2(w, 501)
e1 = libc.eventfd(0, 0); e2 = libc.eventfd(0, 0)
for n in (502, 505): os.dup2(e1, n)
for n in (504, 506, 508): os.dup2(e2, n)
again = os.open("/proc/self/fd/500", os.O_RDONLY)   # the same pipe, a NEW open file description
os.dup2(again, 509)
for fd in (r, w, e1, e2, again): os.close(fd)
"""


def test_group_by_ofd_on_a_real_process(tmp_path):
    with Target(tmp_path, SETUP) as t:
        infos = [i for i in all_fds(t.pid).values() if i.fd >= 500]
        groups = [[i.fd for i in g] for g in group_by_ofd(t.pid, infos)]
        assert groups == [[500, 503, 507], [501], [502, 505], [504, 506, 508], [509]]
        lead = leader_map(t.pid, infos)
        assert lead[507] == 500 and lead[508] == 504 and lead[509] == 509 and lead[501] == 501

"""The judge's cgroup comparison (harness/statediff.py): a hierarchy
mounted or gone between the looks is the machine's, a move is the
process's."""

from harness import statediff


def _diff(b, a):
    return [d["field"] for d in statediff.diff({"cgroup": b}, {"cgroup": a})]


def test_a_hierarchy_mounted_between_the_looks_is_not_a_difference():
    before = "0::/work 3:cpu:/"
    after = "0::/work 3:cpu:/ 13:name=ckpttest:/"       # another test mounted one meanwhile
    assert _diff(before, after) == []
    assert _diff(after, before) == []
    assert _diff("0::/work 4:cpu:/", "0::/work 3:cpu:/") == []    # renumbered only


def test_a_move_within_a_hierarchy_is_a_difference():
    assert _diff("0::/work 3:cpu:/", "0::/ 3:cpu:/") == ["cgroup"]
    assert _diff("0::/work 3:cpu:/a", "0::/work 3:cpu:/b 13:name=x:/") == ["cgroup"]


def test_the_mount_table_of_one_namespace_is_not_the_process_s():
    b = {"ns.mnt": "mnt:[4026531841]", "mountinfo": "22 1 8:1 / / rw"}
    a = {"ns.mnt": "mnt:[4026531841]", "mountinfo": "22 1 8:1 / / rw 90 22 0:50 / /tmp/x rw"}
    assert statediff.diff(b, a) == []
    moved = dict(a, **{"ns.mnt": "mnt:[4026532999]"})       # another namespace: both differ
    assert {d["field"] for d in statediff.diff(b, moved)} == {"ns.mnt", "mountinfo"}

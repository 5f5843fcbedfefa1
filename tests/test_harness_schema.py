"""The scenario schema: file:line errors at collection, and the plugin's
collection behaviour (one item per file, tags as markers) through pytester."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from harness import schema

pytest_plugins = ["pytester"]
REPO = Path(__file__).resolve().parent.parent

GOOD = """\
name: a good one
tags: [files, rename]
setup:
  - file: {path: data, bytes: 64K, seed: 1}
workload:
  fds:
    - {fd: 3, open: data, mode: r, seek: 4096}
between:
  - rename: {from: data, to: other}
expect:
  refused: {reason: file-missing, fd: 3, at: restore}
"""


def load(text: str) -> dict:
    return schema.load("s.yaml", textwrap.dedent(text))


def error(text: str) -> schema.SchemaError:
    with pytest.raises(schema.SchemaError) as ei:
        load(text)
    return ei.value


def test_good_scenario_loads_with_sizes_and_defaults():
    sc = load(GOOD)
    assert sc["setup"][0]["file"]["bytes"] == 65536
    assert sc["restore_on"] == "same"
    assert sc["expect"] == {"refused": {"reason": "file-missing", "fd": 3, "at": "restore"}}
    assert load(GOOD.replace("expect:\n  refused: {reason: file-missing, fd: 3, at: restore}\n", "expect: restored\n"))[
        "expect"] == {"restored": True}


def test_unknown_key_names_line_and_key():
    e = error(GOOD.replace("    - {fd: 3, open: data, mode: r, seek: 4096}",
                           "    - {fd: 3, open: data, mode: r, sek: 4096}"))
    assert (e.line, e.key) == (7, "workload.fds[0].sek")
    assert "unknown key" in str(e) and str(e).startswith("s.yaml:7: ")


def test_wrong_type_names_line():
    e = error(GOOD.replace("bytes: 64K", "bytes: lots"))
    assert (e.line, e.key) == (4, "setup[0].file.bytes")


def test_missing_expect():
    e = error(GOOD.split("expect:")[0])
    assert e.key == "expect" and "missing required key" in e.message


def test_undefined_reason_code():
    e = error(GOOD.replace("file-missing", "file-vanished"))
    assert (e.line, e.key) == (11, "expect.refused.reason")
    assert "engine" in e.message


def test_every_reason_in_the_corpus_is_an_engine_reason():
    from engine.reasons import REASONS
    assert set(schema.ENGINE_REASONS) == set(REASONS)


@pytest.mark.parametrize("old,new,key", [
    ("- rename: {from: data, to: other}", "- move: {from: data, to: other}", "between[0].move"),
    ("path: data, bytes", "path: /etc/data, bytes", "setup[0].file.path"),
    ("{fd: 3, open: data", "{fd: 2, open: data", "workload.fds[0].fd"),
    ("tags: [files, rename]", "tags: [files, bogus]", "tags[1]"),
    ("mode: r,", "mode: x,", "workload.fds[0].mode"),
])
def test_more_errors(old, new, key):
    assert error(GOOD.replace(old, new)).key == key


def test_duplicate_fd_numbers_are_refused():
    e = error(GOOD.replace("    - {fd: 3, open: data, mode: r, seek: 4096}",
                           "    - {fd: 3, open: data, mode: r}\n    - {pipe: {read: 4, write: 3}}"))
    assert e.key == "workload.fds[1]" and "already used" in e.message and e.line == 8


def test_fd_entry_needs_exactly_one_kind():
    e = error(GOOD.replace("{fd: 3, open: data, mode: r, seek: 4096}", "{fd: 3, open: data, fifo: data}"))
    assert "exactly one kind" in e.message


def test_yaml_syntax_error_has_a_line():
    e = error(GOOD.replace("name: a good one", "name: [unclosed"))
    assert e.key == "yaml" and e.line >= 1


def test_parse_size():
    assert schema.parse_size("1G") == 1 << 30 and schema.parse_size("64KiB") == 65536
    assert schema.parse_size(10) == 10 and schema.parse_size("ten") is None


def test_corpus_is_valid_and_large_enough():
    files = sorted((REPO / "scenarios").rglob("*.yaml"))
    assert len(files) >= 40
    loaded = [schema.load(str(f)) for f in files]
    assert sum(1 for s in loaded if s["restore_on"] == "other") >= 3
    cats = {f.parent.name for f in files}
    assert {"files", "rename", "unlink", "fifo", "pipe", "inotify", "socket", "migrate"} <= cats


# -- the plugin, through pytester ----------------------------------------------------

@pytest.fixture
def scen(pytester, monkeypatch, tmp_path):
    monkeypatch.setenv("PYTHONPATH", str(REPO))       # the subprocess imports harness/ and engine/
    monkeypatch.setenv("CRUCIBLE_REPORTS", str(tmp_path / "reports"))
    pytester.makeconftest('pytest_plugins = ["harness.pytest_plugin"]')
    (pytester.path / "scenarios" / "cat").mkdir(parents=True)
    return pytester


def test_plugin_collects_one_item_per_file_with_markers(scen):
    (scen.path / "scenarios/cat/one.yaml").write_text(GOOD)
    (scen.path / "scenarios/cat/two.yaml").write_text(GOOD.replace("tags: [files, rename]", "tags: [pipe]"))
    r = scen.runpytest_subprocess("--collect-only", "-q", "--strict-markers", "-m", "rename")
    r.stdout.fnmatch_lines(["scenarios/cat/one.yaml::one", "*1/2 tests collected (1 deselected)*"])


def test_plugin_two_engines_make_two_items(scen):
    (scen.path / "scenarios/cat/one.yaml").write_text(GOOD)
    r = scen.runpytest_subprocess("--collect-only", "-q", "--engine", "ckpt", "--engine", "criu")
    r.stdout.fnmatch_lines(["scenarios/cat/one.yaml::one?ckpt?", "scenarios/cat/one.yaml::one?criu?"])


def test_plugin_collection_error_runs_nothing(scen):
    (scen.path / "scenarios/cat/good.yaml").write_text(GOOD)
    (scen.path / "scenarios/cat/bad.yaml").write_text(GOOD.replace("seek: 4096}", "seek: 4096, colour: red}"))
    r = scen.runpytest_subprocess("--target", "local")
    r.stdout.fnmatch_lines(["*scenarios/cat/bad.yaml:7: workload.fds?0?.colour: unknown key*",
                            "*Interrupted: 1 error during collection*"])
    assert r.ret == pytest.ExitCode.INTERRUPTED
    r.stdout.no_fnmatch_line("*passed*")


def test_plugin_runs_locally_with_junitxml_xdist_and_a_merged_report(scen, tmp_path):
    """Two real scenarios through the real engine on this host, two xdist
    workers: junit XML names them, the controller's table and JSON hold both."""
    ok = GOOD.replace("expect:\n  refused: {reason: file-missing, fd: 3, at: restore}\n", "expect: restored\n").replace(
        "between:\n  - rename: {from: data, to: other}\n", "")
    (scen.path / "scenarios/cat/one.yaml").write_text(ok)
    (scen.path / "scenarios/cat/two.yaml").write_text(GOOD)
    r = scen.runpytest_subprocess("--target", "local", "-n", "2", "--dist", "worksteal", "--junitxml=j.xml", "-p",
                                  "no:cacheprovider")
    r.assert_outcomes(passed=2)
    r.stdout.fnmatch_lines(["*crucible scenarios*", "scenarios/cat/one.yaml*restored*restored*",
                            "scenarios/cat/two.yaml*refused file-missing fd 3 at restore*refused file-missing fd 3 at restore*"])
    import json
    doc = json.loads((tmp_path / "reports" / "scenarios.json").read_text())
    assert set(doc["scenarios"]) == {"scenarios/cat/one.yaml", "scenarios/cat/two.yaml"}
    assert 'name="one"' in (scen.path / "j.xml").read_text()


def test_min_kernel_says_why_below_the_version_only():
    sc = load(GOOD + textwrap.dedent("""\
        min_kernel: {version: "6.4", why: nothing shows it}
        """))
    assert schema.below_min_kernel(sc, "6.1.0-28-amd64") == \
        "needs Linux 6.4 (this is 6.1.0-28-amd64): nothing shows it"
    assert schema.below_min_kernel(sc, "6.4.0") == "" and schema.below_min_kernel(sc, "6.18.1") == ""
    assert schema.below_min_kernel(load(GOOD), "6.1.0") == ""
    assert error(GOOD + "min_kernel: {version: '6.4'}\n").key == "min_kernel.why"


def test_older_kernels_expectation_applies_below_the_version():
    sc = load(GOOD + textwrap.dedent("""\
        older_kernels:
          below: "6.6"
          why: the kernel does not show it
          expect: restored
        """))
    assert schema.effective_expect(sc, "6.1.0-28-amd64") == {"restored": True}
    assert schema.effective_expect(sc, "6.6.0") == sc["expect"]
    assert schema.effective_expect(sc, "6.18.1") == sc["expect"]
    e = error(GOOD + "older_kernels: {below: six, expect: restored, why: x}\n")
    assert e.key == "older_kernels.below"
    assert error(GOOD + "older_kernels: {below: '6.6', expect: restored}\n").key == "older_kernels.why"


def test_a_distros_expectation_applies_in_that_distro_only_and_wins():
    sc = load(GOOD + textwrap.dedent("""\
        older_kernels: {below: "6.6", why: old, expect: restored}
        distros:
          trixie:
            why: its xz sandboxes itself
            expect: {refused: {reason: unsupported-state, at: dump}}
        """))
    refused = {"refused": {"reason": "unsupported-state", "at": "dump"}}
    assert schema.effective_expect(sc, "6.12.0", "trixie") == refused
    assert schema.effective_expect(sc, "6.1.0", "trixie") == refused         # wins over older_kernels
    assert schema.effective_expect(sc, "6.12.0", "bookworm") == sc["expect"]
    assert schema.effective_expect(sc, "6.1.0", "bookworm") == {"restored": True}
    assert schema.effective_expect(sc, "6.12.0") == sc["expect"]
    e = error(GOOD + "distros: {sid: {why: x, expect: restored}}\n")
    assert e.key == "distros.sid" and e.line == len(GOOD.splitlines()) + 1
    assert error(GOOD + "distros: {trixie: {expect: restored}}\n").key == "distros.trixie.why"
    assert error(GOOD + "distros: {trixie: {why: x, expect: {refused: {reason: nonsense, at: dump}}}}\n").key \
        == "distros.trixie.expect.refused.reason"


@pytest.mark.parametrize("entry,key,words", [
    ("{fd: 3, socket: unix-pair, peer_fd: 4, carry: [file, fifo]}", "workload.fds[0].carry[1]", "one of"),
    ("{fd: 3, socket: tcp-listen, carry: [file]}", "workload.fds[0].carry", "only a unix-pair"),
    ("{fd: 3, socket: udp, passcred: true}", "workload.fds[0].passcred", "only a unix-pair"),
    ("{fd: 3, socket: unix-pair, peer_fd: 4, passcred: yes please}", "workload.fds[0].passcred", ""),
])
def test_files_and_credentials_in_flight_are_a_unix_pairs(entry, key, words):
    e = error(GOOD.replace("{fd: 3, open: data, mode: r, seek: 4096}", entry))
    assert e.key == key and words in e.message, (e.key, e.message)


@pytest.mark.parametrize("entry,key", [
    ("{fd: 3, lock: lease, path: data, start: 5}", "workload.fds[0].start"),
    ("{fd: 3, lock: lease, path: data, mode: write, outside: lock}", "workload.fds[0].outside"),
    ("{fd: 3, lock: flock, path: data, outside: break}", "workload.fds[0].outside"),
])
def test_lease_entries_checked(entry, key):
    assert error(GOOD.replace("{fd: 3, open: data, mode: r, seek: 4096}", entry)).key == key


# -- the program workload (harness/program.py) ------------------------------------------

PROGRAM = """\
name: a program
tags: [program]
workload:
  program:
    run: ["{programs}/cthreads", ctl]
    fifos: [ctl]
    ready: {output: '^ready', settle: 0.5}
    before:
      - wait: {output: '^start main tid=(?P<tid>\\\\d+)$'}
      - connect: {name: c, tcp: 6379}
      - send: {conn: c, data: "SET k {token}\\r\\n", expect: '^\\\\+OK'}
      - sequence: {name: ticks, output: '^tick (?P<n>\\\\d+)$', advance: 3}
    after:
      - sequence: {name: ticks, output: '^tick (?P<n>\\\\d+)$'}
      - write: {path: ctl, data: "go\\n"}
      - wait: {lines: ['^woke main tid={tid}$', '^x{2,3}$'], since: dump}
      - exec: {argv: [redis-cli, GET, k], expect: '^{token}$'}
expect: restored
"""


def test_program_scenario_loads():
    sc = load(PROGRAM)
    prog = sc["workload"]["program"]
    assert prog["run"] == ["{programs}/cthreads", "ctl"] and prog["ready"]["settle"] == 0.5
    assert [next(iter(s)) for s in prog["after"]] == ["sequence", "write", "wait", "exec"]


@pytest.mark.parametrize("old,new,line,key,words", [
    # an undefined {var}: neither built in nor captured by an earlier step
    ("'^woke main tid={tid}$'", "'^woke main tid={tdi}$'", 16, "workload.program.after[2].wait", "{tdi} is not defined"),
    # a capture is only known after the step that makes it
    ("run: [\"{programs}/cthreads\", ctl]", "run: [\"{programs}/cthreads\", \"{tid}\"]", 5, "workload.program.run",
     "{tid} is not defined"),
    ("send: {conn: c,", "send: {conn: d,", 11, "workload.program.before[2].send", "no connection named 'd'"),
    ("output: '^tick (?P<n>\\\\d+)$', advance: 3}", "output: '^tick (\\\\d+)$', advance: 3}", 12,
     "workload.program.before[3].sequence", "(?P<n>"),
    ("      - sequence: {name: ticks, output: '^tick (?P<n>\\\\d+)$'}",
     "      - sequence: {name: tocks, output: '^tick (?P<n>\\\\d+)$'}", 14, "workload.program.after[0].sequence",
     "continues one checked before"),
    ("ready: {output: '^ready', settle: 0.5}", "ready: {output: '^(ready', settle: 0.5}", 7,
     "workload.program.ready.output", "not a valid regular expression"),
    ("      - write: {path: ctl, data: \"go\\n\"}", "      - write: {path: /etc/passwd, data: \"go\\n\"}", 15,
     "workload.program.after[1].write.path", "relative to the scenario"),
    ("      - write: {path: ctl", "      - poke: {path: ctl", 15, "workload.program.after[1].poke", "unknown program step"),
    ("    run: [\"{programs}/cthreads\", ctl]\n", "    run: [\"{programs}/cthreads\", ctl]\n    sh: 'x'\n", 5,
     "workload.program", "exactly one of run, sh"),
    ("exec: {argv: [redis-cli, GET, k],", "exec: {argv: [redis-cli, GET, k], rc: many,", 17,
     "workload.program.after[3].exec.rc", "expected an integer"),
])
def test_program_mistakes_name_file_line_and_key(old, new, line, key, words):
    assert old in PROGRAM, old
    e = error(PROGRAM.replace(old, new))
    assert (e.line, e.key) == (line, key), str(e)
    assert words in e.message and str(e).startswith(f"s.yaml:{line}: ")


def test_program_excludes_python_workload_parts_and_migration():
    e = error(PROGRAM.replace("workload:\n", "workload:\n  fds: []\n"))
    assert e.key == "workload.fds" and "no fds, mmaps or process" in e.message
    e = error(PROGRAM + "restore_on: other\n")
    assert e.key == "restore_on" and e.line == 19
    e = error(PROGRAM + "dump: {leave_running: true}\n")
    assert e.key == "dump.leave_running"


def test_every_program_scenario_loads():
    files = sorted((REPO / "scenarios" / "programs").glob("*.yaml"))
    assert files
    for f in files:
        assert "program" in schema.load(str(f))["workload"], f


def test_program_refusal_is_a_set_of_reasons_without_fds():
    sc = load(PROGRAM.replace("expect: restored\n", "expect:\n  refused: {reason: tty, at: dump}\n"))
    assert sc["expect"]["refused"] == {"reason": "tty", "at": "dump", "also": []}
    e = error(PROGRAM.replace("expect: restored\n", "expect:\n  refused: {reason: tty, fd: 3, at: dump}\n"))
    assert e.key == "expect.refused.fd" and "reason codes" in e.message
    e = error(PROGRAM.replace("expect: restored\n", "expect:\n  refused: {reason: tty, also: [nope], at: dump}\n"))
    assert e.key == "expect.refused.also[0]" and e.line == 19
    e = error(GOOD.replace("{reason: file-missing, fd: 3, at: restore}", "{reason: file-missing, also: [tty], at: restore}"))
    assert e.key == "expect.refused.also" and "only a program" in e.message


def test_program_refusal_judged_by_its_exact_reason_set():
    from harness import runner
    want = {"refused": {"reason": "tty", "also": ["tty-outside"], "at": "dump"}}

    def res(*reasons, at="dump"):
        return runner.Result("s", "ckpt", outcome="refused", at=at,
                             refusals=[{"reason": r, "fd": i} for i, r in enumerate(reasons)])
    assert runner.judge(want, res("tty", "tty", "tty-outside")).passed
    assert not runner.judge(want, res("tty")).passed                       # one missing
    assert not runner.judge(want, res("tty", "tty-outside", "socket")).passed  # one more
    assert not runner.judge(want, res("tty", "tty-outside", at="restore")).passed
    assert runner.expected_text(want) == "refused tty,tty-outside at dump"


CHILDREN = GOOD.replace("    - {fd: 3, open: data, mode: r, seek: 4096}\n",
                        "    - {fd: 3, open: data, mode: r, seek: 4096}\n  process:\n    children:\n      - CHILD\n")


@pytest.mark.parametrize("child,key,why", [
    ("{blocked_in: sleep, share: [files, fs]}", None, None),
    ("{blocked_in: sleep, share: [vm]}", "workload.process.children[0].share[0]", "what a child can share"),
    ("{blocked_in: read, share: [fs, fs]}", "workload.process.children[0].share", "at most once"),
    ("{blocked_in: zombie, share: [files]}", "workload.process.children[0].share", "a zombie holds no"),
])
def test_child_share(child, key, why):
    text = CHILDREN.replace("CHILD", child)
    if key is None:
        assert load(text)["workload"]["process"]["children"][0]["share"] == ["files", "fs"]
        return
    e = error(text)
    assert e.key == key and why in e.message, (e.key, e.message)


def test_program_on_a_terminal_outside():
    tty = PROGRAM.replace("    fifos: [ctl]\n", "    tty: outside\n").replace(
        '      - write: {path: ctl, data: "go\\n"}', '      - type: {data: "q"}')
    assert load(tty)["workload"]["program"]["tty"] == "outside"
    e = error(tty.replace("    tty: outside\n", "    tty: outside\n    fifos: [ctl]\n    stdin: ctl\n"))
    assert e.key == "workload.program.tty" and "not a fifo" in e.message
    e = error(PROGRAM.replace('      - write: {path: ctl, data: "go\\n"}', '      - type: {data: "q"}'))
    assert e.key == "workload.program.after[1].type" and e.line == 15 and "tty: outside" in e.message


SEGMENT = """\
name: moves
tags: [migrate, socket]
segment: {moves: 10.77.0.1/24, stays: 10.77.0.2/24}
workload:
  fds:
    - {fd: 3, socket: tcp-established, sender: outside, bind: 10.77.0.1, peer_bind: 10.77.0.2}
restore_on: other
expect: restored
"""


def test_segment_scenario_loads():
    assert load(SEGMENT)["segment"] == {"moves": "10.77.0.1/24", "stays": "10.77.0.2/24"}


@pytest.mark.parametrize("old,new,key,words", [
    ("restore_on: other\n", "", "segment", "restore_on: other"),
    ("stays: 10.77.0.2/24", "stays: 10.78.0.2/24", "segment", "one subnet"),
    ("moves: 10.77.0.1/24", "moves: elsewhere", "segment", "not an address"),
    ("bind: 10.77.0.1,", "bind: 10.77.0.9,", "workload.fds[0].bind", "moves and stays"),
    ("peer_bind: 10.77.0.2}", "data: {bytes: 5}}", "workload.fds[0].bind", "both"),
])
def test_segment_errors(old, new, key, words):
    e = error(SEGMENT.replace(old, new))
    assert e.key == key and words in e.message, (e.key, e.message)


def test_segment_moving_address_leaves_the_staying_one():
    # removing a primary address removes its secondaries unless
    # promote_secondaries is on: the staying client's address must survive
    from harness import segment
    script = segment.up(["10.77.0.2/24", "10.77.0.1/24"])[2]
    assert "echo 1 > /proc/sys/net/ipv4/conf/$nic/promote_secondaries" in script
    assert script.index("promote_secondaries") < script.index("ip addr add")


@pytest.mark.parametrize("leave,key,why", [
    ("[files]", None, None),
    ("[files, files]", "workload.process.leave", "at most once"),
    ("[fs]", "workload.process.leave", "no child shares the workload's fs"),
    ("[vm]", "workload.process.leave[0]", "what the workload can leave"),
])
def test_process_leave(leave, key, why):
    text = CHILDREN.replace("CHILD", "{blocked_in: sleep, share: [files]}").replace(
        "  process:\n", f"  process:\n    leave: {leave}\n")
    if key is None:
        assert load(text)["workload"]["process"]["leave"] == ["files"]
        return
    e = error(text)
    assert e.key == key and why in e.message, (e.key, e.message)

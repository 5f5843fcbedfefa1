"""harness/hostcriu.py: the private trixie criu for the host comparison.

No network here: the apt configuration is checked with apt's own
apt-config/indextargets (which read no mirror), the wrapper with a fake
loader, the choice of a working criu with fake criu commands. The real
install is exercised by `make host-criu` / `harness compare --host`; when it
is in the cache, the last test runs its `criu check`.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from harness import hostcriu


def test_parse_version():
    assert hostcriu.parse_version("Version: 4.1.1\n") == (4, 1, 1)
    assert hostcriu.parse_version("Version: 3.17.1") == (3, 17, 1)
    assert hostcriu.parse_version("Version: 4.2\nGitID: v4.2-12-gdeadbee\n") == (4, 2)
    assert hostcriu.parse_version("criu: error while loading shared libraries: libnet.so.1") is None
    assert hostcriu.parse_version("") is None


def test_closure_reads_the_solvers_choice():
    sim = """NOTE: This is only a simulation!
Inst gcc-14-base (14.2.0-19 Debian:13.2/stable [amd64])
Inst libc6 (2.41-12+deb13u5 Debian:13.2/stable, Debian-Security:13/stable-security [amd64])
Inst libfoo [1.0-1] (1.1-2 Debian:13.2/stable [amd64])
Inst criu (4.1.1-1 Debian:13.2/stable [amd64])
Conf libc6 (2.41-12+deb13u5 Debian:13.2/stable [amd64])
"""
    assert hostcriu.closure(sim) == {"gcc-14-base": "14.2.0-19", "libc6": "2.41-12+deb13u5",
                                     "libfoo": "1.1-2", "criu": "4.1.1-1"}


def _apt(tmp_path: Path) -> hostcriu.PrivateApt:
    return hostcriu.PrivateApt(tmp_path / "apt", "amd64",
                               [f"deb [signed-by={hostcriu.KEYRING}] http://mirror.invalid/debian trixie main"])


@pytest.mark.skipif(not shutil.which("apt-config"), reason="needs apt")
def test_private_apt_keeps_every_state_dir_private(tmp_path):
    """Lists, status, cache, sources and keys all under the private root:
    nothing written to or read from the host's apt state."""
    apt = _apt(tmp_path)
    out = subprocess.run(["apt-config"] + apt.opts + ["dump"], capture_output=True, text=True, check=True).stdout
    conf = {}
    for line in out.splitlines():
        k, _, v = line.partition(" ")
        conf[k] = v.strip('";')
    root = str(tmp_path / "apt")
    for key in ("Dir::State::lists", "Dir::State::status", "Dir::Cache", "Dir::Etc::sourcelist",
                "Dir::Etc::sourceparts", "Dir::Etc::trustedparts", "Dir::Etc::preferencesparts"):
        assert conf[key].startswith(root), (key, conf[key])


@pytest.mark.skipif(not shutil.which("apt-get"), reason="needs apt")
def test_private_apt_sees_only_its_own_sources(tmp_path):
    """The host's sources (bookworm here) are not among the private
    config's index targets; its own trixie line is."""
    apt = _apt(tmp_path)
    out = apt.run("apt-get", ["indextargets", "--no-release-info", "--format", "$(SITE) $(RELEASE)"])
    targets = set(out.split("\n")) - {""}
    assert targets == {"http://mirror.invalid/debian trixie"}, targets


def test_sources_lines_are_signed(monkeypatch):
    import vm.image
    monkeypatch.setattr(vm.image, "host_mirrors", lambda suite: [f"deb http://m.invalid/debian {suite} main",
                                                                 f"deb http://m.invalid/sec {suite}-security main"])
    assert hostcriu.sources_lines("trixie") == [
        f"deb [signed-by={hostcriu.KEYRING}] http://m.invalid/debian trixie main",
        f"deb [signed-by={hostcriu.KEYRING}] http://m.invalid/sec trixie-security main"]


def _fake_prefix(tmp_path: Path) -> Path:
    """A prefix whose 'loader' prints the arguments it was given, and its
    stamp as install() writes it."""
    prefix = tmp_path / "prefix"
    root = prefix / "root"
    lib = root / "usr/lib/x86_64-linux-gnu"
    lib.mkdir(parents=True)
    (root / "usr/sbin").mkdir(parents=True)
    (lib / "libc.so.6").write_text("")
    loader = lib / "ld-linux-x86-64.so.2"
    loader.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    loader.chmod(0o755)
    argv = hostcriu.command_in(prefix, hostcriu._loader(root), hostcriu._libdirs(root))
    (prefix / "criu").write_text(hostcriu.WRAPPER.format(suite="trixie", version="4.1.1-1",
                                                          argv=shlex.join(argv)))
    (prefix / "criu").chmod(0o755)
    (prefix / hostcriu.STAMP).write_text(json.dumps({
        "suite": "trixie", "deb_version": "4.1.1-1", "loader": hostcriu._loader(root),
        "libdirs": hostcriu._libdirs(root)}))
    return prefix


def test_command_runs_criu_through_the_prefix_loader(tmp_path):
    prefix = _fake_prefix(tmp_path)
    root = str(prefix / "root")
    argv = hostcriu.command(prefix)
    assert argv == [f"{root}/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
                    "--library-path", f"{root}/usr/lib/x86_64-linux-gnu", f"{root}/usr/sbin/criu",
                    "--libdir", f"{root}/usr/lib/criu"]
    # the wrapper runs the same, the caller's arguments kept whole
    out = subprocess.run([str(prefix / "criu"), "dump", "-t", "1 2"], capture_output=True, text=True,
                         check=True, close_fds=True).stdout.splitlines()
    assert out == argv[1:] + ["dump", "-t", "1 2"]


def test_command_none_without_a_complete_install(tmp_path):
    prefix = _fake_prefix(tmp_path)
    (prefix / "criu").unlink()                           # interrupted before the wrapper
    assert hostcriu.command(prefix) is None
    assert hostcriu.command(tmp_path / "nothing") is None


def test_loader_missing_is_an_error(tmp_path):
    (tmp_path / "usr/lib/x86_64-linux-gnu").mkdir(parents=True)
    with pytest.raises(hostcriu.HostCriuError, match="no dynamic loader"):
        hostcriu._loader(tmp_path)


def _fake_criu(tmp_path: Path, name: str, check_rc: int, check_err: str = "") -> str:
    p = tmp_path / name
    (tmp_path / f"{name}.err").write_text(check_err)
    p.write_text(f"""#!/bin/sh
case "$1" in
  check) cat '{tmp_path}/{name}.err' >&2; exit {check_rc};;
  --version) echo 'Version: 9.9'; exit 0;;
esac
exit 2
""")
    p.chmod(0o755)
    return str(p)


# Debian 12's criu 3.17.1 on kernel 6.18, with a warning after the errors
# (criu warns during its clean-up too): the reason is the last Error line.
BOOKWORM_ERR = ("Error (criu/util.c:642): exited, status=1\n"
                "Error (criu/vdso.c:381): vdso: Unexpected rt vDSO area bounds\n"
                "Error (criu/kerndat.c:1615): kerndat_vdso_fill_symtable failed when initializing kerndat.\n"
                "Error (criu/crtools.c:260): Could not initialize kernel features detection.\n"
                "Warn  (criu/kerndat.c:1285): Can't keep kdat cache on non-tempfs\n")


def test_run_check_reports_the_error_line(tmp_path):
    bad = _fake_criu(tmp_path, "bad", 1, BOOKWORM_ERR)
    good = _fake_criu(tmp_path, "good", 0, "Warn  (criu/kerndat.c:1285): Can't keep kdat cache\n")
    assert hostcriu.run_check([good]) == (True, "")
    ok, why = hostcriu.run_check([bad])
    assert not ok and why == "Error (criu/crtools.c:260): Could not initialize kernel features detection."
    ok, why = hostcriu.run_check([str(tmp_path / "absent")])
    assert not ok and "could not run" in why


def test_choose_prefers_the_first_working_criu(tmp_path):
    bad = [_fake_criu(tmp_path, "bad", 1, BOOKWORM_ERR)]
    good = [_fake_criu(tmp_path, "good", 0)]
    good2 = ["/bin/sh", _fake_criu(tmp_path, "good2", 0)]
    assert hostcriu.choose([("private", good), ("host", good2)]) == (("private", good), [])
    chosen, why = hostcriu.choose([("private", None), ("host", bad), ("other", good2)])
    assert chosen == ("other", good2)
    assert why[0] == "private: not installed"
    assert why[1].startswith(f"host ({bad[0]}): criu check fails") and why[1].endswith("features detection.")
    chosen, why = hostcriu.choose([("private", bad), ("host", None)])
    assert chosen is None and len(why) == 2


def test_installed_needs_stamp_and_wrapper(tmp_path):
    assert hostcriu.installed(tmp_path) is None
    (tmp_path / hostcriu.STAMP).write_text('{"suite": "trixie", "deb_version": "4.1.1-1"}')
    assert hostcriu.installed(tmp_path) is None          # no wrapper: an interrupted install
    (tmp_path / "criu").write_text("#!/bin/sh\n")
    assert hostcriu.installed(tmp_path)["deb_version"] == "4.1.1-1"
    (tmp_path / hostcriu.STAMP).write_text("not json")
    assert hostcriu.installed(tmp_path) is None


@pytest.mark.skipif(os.geteuid() != 0 or not hostcriu.command(), reason="private criu not installed (make host-criu)")
def test_installed_private_criu_works_here():
    for argv in (hostcriu.command(), [str(hostcriu.prefix_dir() / "criu")]):
        assert hostcriu.parse_version(hostcriu.version_of(argv)) >= (4,)
        assert hostcriu.run_check(argv) == (True, "")

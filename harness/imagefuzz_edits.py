"""The semantic edits of harness/imagefuzz.py: a record of an image (or a
tree's tree.json) changed to a value that breaks a rule of the kernel or of
the image format, and the manifest re-hashed so every checksum passes - only
engine/imagecheck.py stands between such an image and a process."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, List, Tuple

MANIFEST = "manifest.json"


def _files(img: str, manifest: bool = True) -> List[str]:
    out = []
    for root, _, names in os.walk(img):
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), img)
            if manifest or rel != MANIFEST:
                out.append(rel)
    return sorted(out)


# -- semantic edits ---------------------------------------------------------------------

def _fd(recs, rng, pred=lambda r: True):
    cands = [r for r in recs if pred(r)]
    return rng.choice(cands) if cands else None


def _ghost(recs):
    for r in recs:
        if isinstance(r.get("ghost"), dict):
            return r["ghost"]
    return None


BAD_PATHS = ["relative/path", "/tmp/../etc/passwd", "/tmp/a\0b", "", "/tmp/./x", "/a//b", "../../../etc/shadow"]


def _edits() -> List[Tuple[str, Callable]]:
    """(name, edit(records, rng) -> description or None). `records` maps
    core/mm/fds/manifest to the loaded JSON, edited in place."""
    E: List[Tuple[str, Callable]] = []

    def edit(name):
        def deco(f):
            E.append((name, f))
            return f
        return deco

    @edit("pid")
    def _(R, rng):
        v = rng.choice([0, -1, 1 << 31, (1 << 22) + 7, "1234", True, 1.5, None])
        R["core"]["pid"] = v
        return f"core pid = {v!r}"

    @edit("umask")
    def _(R, rng):
        v = rng.choice([0o1000, -1, 1 << 40, "022"])
        R["core"]["umask"] = v
        return f"core umask = {v!r}"

    @edit("comm")
    def _(R, rng):
        v = rng.choice(["x" * 40, "a\0b", 7])
        R["core"]["comm"] = v
        return f"core comm = {v!r}"

    @edit("cwd-path")
    def _(R, rng):
        v = rng.choice(BAD_PATHS)
        R["core"]["cwd"]["path"] = v
        return f"core cwd.path = {v!r}"

    @edit("exe-path")
    def _(R, rng):
        v = rng.choice(BAD_PATHS)
        R["core"]["exe"]["file"]["path"] = v
        return f"core exe path = {v!r}"

    @edit("creds")
    def _(R, rng):
        c = R["core"]["creds"]
        k = rng.choice(["uid", "gid", "groups", "caps", "no_new_privs"])
        v = {"uid": [[-1, 0, 0, 0], [0, 0, 0], [1 << 32, 0, 0, 0], ["0", 0, 0, 0]],
             "gid": [[0, 0, 0, -5], None, [0.0, 0, 0, 0]],
             "groups": [[-1], "0", [1 << 40]],
             "caps": [dict(c["caps"], CapEff="zz"), [], dict(c["caps"], CapPrm=None)],
             "no_new_privs": ["2", 1, None]}[k]
        c[k] = rng.choice(v)
        return f"core creds.{k} = {c[k]!r}"

    @edit("rlimits")
    def _(R, rng):
        i = rng.randrange(len(R["core"]["rlimits"]))
        v = rng.choice([[10, 5], [-1, 5], [0, -1], [1 << 65, 1 << 65], [1]])
        R["core"]["rlimits"][i] = v
        return f"core rlimit {i} = {v}"

    @edit("itimers")
    def _(R, rng):
        i = rng.randrange(3)
        v = rng.choice([[0, 0, 1, 2_000_000], [0, -1, 0, 0], [0, 2_000_000, 0, 0], [-5, 0, 0, 0]])
        R["core"]["itimers"][i] = v
        return f"core itimer {i} = {v}"

    @edit("sigaction")
    def _(R, rng):
        k = rng.choice(["0", "65", "abc", "-1", "9"])
        v = rng.choice([[0, 0, 0, 0], [0, 0], [-1, 0, 0, 0], [1 << 64, 0, 0, 0]])
        R["core"]["sigactions"][k] = v
        return f"core sigaction {k} = {v}"

    @edit("sigmask")
    def _(R, rng):
        v = rng.choice([-1, 1 << 64, "0"])
        R["core"]["sigmask"] = v
        return f"core sigmask = {v!r}"

    @edit("regs")
    def _(R, rng):
        regs = R["core"]["regs"]
        k = rng.choice(sorted(regs))
        if rng.random() < 0.4:
            del regs[k]
            return f"core regs: {k} removed"
        regs[k] = rng.choice([-1, 1 << 64, "0", None])
        return f"core regs.{k} = {regs[k]!r}"

    @edit("threads")
    def _(R, rng):
        v = rng.choice(["x", [{"tid": R["core"]["pid"]}], [{"tid": 0}], [None]])
        R["core"]["threads"] = v
        return f"core threads = {v!r}"

    @edit("core-key")
    def _(R, rng):
        k = rng.choice(["pid", "sigmask", "umask", "personality", "brk", "tid_address", "comm", "regs", "mm",
                        "rseq", "cwd", "session", "creds", "sigactions", "exe", "xstate", "auxv",
                        "robust_list", "rlimits", "sigaltstack", "itimers", "signals", "sched", "seccomp",
                        "posix_timers"])
        del R["core"][k]
        return f"core {k} removed"

    @edit("core-type")
    def _(R, rng):
        k = rng.choice(sorted(R["core"]))
        old = R["core"][k]
        new = rng.choice([v for v in ("s", 1, [1], {"a": 1}, None, True) if type(v) is not type(old)])
        if k in ("exit_signal",) or (old in ([], {}) and new in ([], {})):
            return None
        R["core"][k] = new
        return f"core {k} = {new!r} (was a {type(old).__name__})"

    @edit("mm-range")
    def _(R, rng):
        vmas = R["mm"]["vmas"]
        i = rng.randrange(len(vmas) - 1)
        v = vmas[i]
        w = rng.randrange(6)
        if w == 0:
            v["start"], v["end"] = v["end"], v["start"]
        elif w == 1:
            v["start"] += 1
        elif w == 2:
            v["end"] = 1 << 60
        elif w == 3 and i > 0:
            v["start"] = vmas[i - 1]["start"]
        elif w == 4:
            v["offset"] = rng.choice([-4096, 5, 1 << 63])
        else:
            v["end"] = v["start"]
        return f"mm vma {i} range edit {w}"

    @edit("mm-run")
    def _(R, rng):
        cands = [v for v in R["mm"]["vmas"] if v["pages"]]
        v = rng.choice(cands)
        run = v["pages"][rng.randrange(len(v["pages"]))]
        w = rng.randrange(6)
        if w == 0:
            run[0] = v["end"]
        elif w == 1:
            run[1] = rng.choice([0, -1, 1 << 40])
        elif w == 2:
            run[2] = rng.choice([1, 7, -1])
        elif w == 3:
            run[3] = rng.choice([1 << 40, -4096, 100])
        elif w == 4:
            run[1] += 1
        else:
            run[:] = run[:3]
        return f"mm page run edit {w}: {run}"

    @edit("mm-count")
    def _(R, rng):
        v = rng.choice([0, 2, -1, "1"])
        if v == 0 and not any(x["pages"] for x in R["mm"]["vmas"]):
            return None
        R["mm"]["page_files"] = v
        return f"mm page_files = {v!r}"

    @edit("mm-kind")
    def _(R, rng):
        v = rng.choice(R["mm"]["vmas"])
        w = rng.randrange(4)
        if w == 0:
            v["kind"] = "evil"
        elif w == 1:
            v["perms"] = "rw"
        elif w == 2:
            fv = [x for x in R["mm"]["vmas"] if x["kind"] == "file"]
            v = rng.choice(fv)
            v["file"]["file"]["path"] = rng.choice(BAD_PATHS)
        else:
            v["kind"] = "file"
            v["file"] = None
        return f"mm vma edit {w}"

    @edit("fd-number")
    def _(R, rng):
        r = _fd(R["fds"], rng)
        v = rng.choice([-1, 1 << 31, (1 << 20) + 1, "3", None, R["fds"][0]["fd"] if r is not R["fds"][0] else -2])
        r["fd"] = v
        return f"fds fd {r.get('kind')} = {v!r}"

    @edit("fd-dup")
    def _(R, rng):
        r = _fd(R["fds"], rng, lambda r: "dup_of" in r) or _fd(R["fds"], rng)
        v = rng.choice([r["fd"], 999, -1, "4"])
        r["dup_of"] = v
        return f"fds fd {r['fd']} dup_of = {v!r}"

    @edit("fd-fields")
    def _(R, rng):
        r = _fd(R["fds"], rng)
        k = rng.choice(["flags", "pos", "cloexec", "kind"])
        v = {"flags": [-1, 1 << 70, "2"], "pos": [-1, 1 << 64], "cloexec": ["yes", 1],
             "kind": ["evil", 3]}[k]
        r[k] = rng.choice(v)
        return f"fds fd {r['fd']} {k} = {r[k]!r}"

    @edit("fd-file-path")
    def _(R, rng):
        r = _fd(R["fds"], rng, lambda r: isinstance(r.get("file"), dict))
        if r is None:
            return None
        v = rng.choice(BAD_PATHS)
        r["file"]["path"] = v
        return f"fds fd {r['fd']} file path = {v!r}"

    @edit("fd-data")
    def _(R, rng):
        r = _fd(R["fds"], rng, lambda r: isinstance(r.get("data"), str))
        if r is None:
            return None
        v = rng.choice(["../../etc/passwd", "/etc/passwd", "fds/nothing", "core.json", "manifest.json", 5,
                        "fds/../core.json"])
        if rng.random() < 0.3:
            r["data_len"] = r.get("data_len", 0) + 1
            return f"fds fd {r['fd']} data_len + 1"
        r["data"] = v
        return f"fds fd {r['fd']} data = {v!r}"

    @edit("ghost")
    def _(R, rng):
        g = _ghost(R["fds"])
        if g is None:
            return None
        k = rng.choice(["name", "extents", "size", "data_bytes", "ghost", "mode"])
        v = {"name": ["relative (deleted)", "/tmp/../etc/x (deleted)", "/tmp/a\0b (deleted)", 5],
             "extents": [[[0, 1 << 40]], [[-1, 300]], [[0, 100], [50, 100]], "x", [[0, 0]]],
             "size": [-1, 10, "300"], "data_bytes": [301, -300], "ghost": ["../../x", "a/b", 1],
             "mode": [-1, "0600"]}[k]
        g[k] = rng.choice(v)
        return f"ghost {k} = {g[k]!r}"

    @edit("fd-kind-field")
    def _(R, rng):
        r = _fd(R["fds"], rng, lambda r: r["kind"] in ("eventfd", "timerfd", "epoll", "inotify", "socket", "pipe"))
        k = r["kind"]
        if k == "eventfd":
            f, v = "count", rng.choice([-1, 1 << 64, (1 << 64) - 1, "5", None])
        elif k == "timerfd":
            f, v = rng.choice(["clockid", "ticks", "interval_ns", "remaining_ns", "abstime"]), \
                rng.choice([-1, 99, "x", 1 << 64, None])
        elif k == "epoll":
            f, v = "targets", rng.choice([[{"data": 1, "events": 25, "tfd": 77}], [{"tfd": -1}], "x", [None],
                                          [{"data": -1, "events": 25, "tfd": 9}],
                                          [{"data": 1, "events": 1 << 33, "tfd": 9}]])
        elif k == "inotify":
            w = r["watches"][0]
            f = rng.choice(["path", "wd", "mask"])
            v = rng.choice(["/tmp/../x", -1, "x", None, 0, 1 << 33])
            w[f] = v
            return f"fds inotify watch {f} = {v!r}"
        elif k == "socket":
            f, v = "lengths", rng.choice([[100], [-1], "x", [5, 7, 1], [1 << 40]])
        else:
            f = rng.choice(["size", "end", "data_len"])
            v = rng.choice([-1, "x", 1 << 40, None, "rwx", 0, 1 << 20])
        r[f] = v
        return f"fds {k} {f} = {v!r}"

    @edit("manifest-name")
    def _(R, rng):
        files = R["manifest"]["files"]
        name = rng.choice(sorted(files))
        meta = files.pop(name)
        v = rng.choice(["../" + os.path.basename(name), "/etc/passwd", name + "\0", "./" + name, name + "/",
                        "fds/../" + os.path.basename(name), "a" * 5000])
        files[v] = meta
        return f"manifest renames {name} to {v[:40]!r}"

    @edit("manifest-field")
    def _(R, rng):
        m = R["manifest"]
        w = rng.randrange(9)
        name = rng.choice(sorted(m["files"]))
        if w == 0:
            m["files"][name]["size"] = rng.choice([-1, True, "10", 1 << 70])
        elif w == 1:
            e = m["files"][name]
            key = "sha256" if "sha256" in e else "crc32"     # a pages file's digest: engine/pagecrc.py
            e[key] = e[key].upper()
        elif w == 2:
            m["format"] = rng.choice([0, 999, "1", None])
        elif w == 3:
            m["arch"] = rng.choice(["aarch64", "", 5])
        elif w == 4:
            m["files"] = rng.choice([[], "x", None])
        elif w == 5:
            m["kernel"] = "0.0.0-other"
        elif w == 7:
            # the namespaces the pids are numbers of (engine/pidns.py): malformed, missing
            m["meta"]["namespaces"] = rng.choice([{"pid": "x"}, {"pid": 1, "bogus": 2}, [], {"mnt": 5}, None])
        elif w == 8:
            # ... or another pid namespace's (dumped in a container, restored here)
            m["meta"]["namespaces"]["pid"] += rng.choice([1, 1 << 20])
        else:
            m["meta"] = rng.choice(["x", [1]])
        return f"manifest field edit {w}"

    @edit("core-misc")
    def _(R, rng):
        c = R["core"]
        w = rng.randrange(8)
        if w == 0:
            c["session"][rng.choice(["sid", "pgid"])] = rng.choice([-1, 0, "1", 1 << 40])
        elif w == 1:
            c["rseq"][rng.choice(["pointer", "size", "signature", "flags"])] = rng.choice([-1, "0", 1 << 64])
        elif w == 2:
            c["sched"]["affinity"] = rng.choice([[], [-1], [99999], "0"])
        elif w == 3:
            c["seccomp"] = rng.choice([{"mode": 5, "filters": []}, {"mode": 2, "filters": "x"}, {"mode": -1}])
        elif w == 4:
            c["posix_timers"] = rng.choice(["x", [None], [{"id": -1}]])
        elif w == 5:
            c["signals"] = rng.choice([{"thread": "x", "shared": []}, {"thread": [{"signo": 99}], "shared": []}])
        elif w == 6:
            c["auxv"] = rng.choice([[1, 2, 3], [-1, 0], ["x"]])
        else:
            c["sigaltstack"] = rng.choice([[0, 2], [-1, 0, 0], [0, 0, 1 << 64]])
        return f"core misc edit {w}"

    return E


EDITS = _edits()


def m_content(img, outside, rng, prefix=""):
    """A data file or a record replaced by something else of the right kind
    of wrong, re-hashed into the manifest."""
    w = rng.randrange(7)
    names = [n[len(prefix):] for n in _files(img, manifest=False) if n.startswith(prefix)]
    if w == 0:
        name, data = "xstate.bin", rng.choice([b"", b"\0" * 100, bytes(rng.randrange(256) for _ in range(64))])
    elif w == 1:
        name = rng.choice([n for n in names if n.startswith("pages-")])
        data = open(os.path.join(img, name), "rb").read()[: rng.choice([0, 4096, 8192])]
    elif w == 2:
        gs = [n for n in names if n.startswith("ghosts/")]
        if not gs:
            return None
        name, data = rng.choice(gs), b"x"
    elif w == 3:
        fs = [n for n in names if n.startswith("fds/")]
        if not fs:
            return None
        name = rng.choice(fs)
        data = open(os.path.join(img, name), "rb").read() + b"more"
    elif w == 4:
        name, data = rng.choice(list(RECORDS.values())), rng.choice([b"[]", b'"x"', b"null", b"1", b"{}"])
    elif w == 5:
        name, data = rng.choice(list(RECORDS.values())), b"[" * 100000 + b"]" * 100000
    else:
        name, data = rng.choice(list(RECORDS.values())), b'{"pid": "\xff\xfe"}'
    name = prefix + name
    with open(os.path.join(img, name), "wb") as f:
        f.write(data)
    reseal(img, json.load(open(os.path.join(img, MANIFEST))), [name])
    return f"content of {name} replaced ({len(data)} bytes), re-hashed"
RECORDS = {"core": "core.json", "mm": "mm.json", "fds": "fds.json"}


def reseal(img: str, manifest: dict, changed: List[str]) -> None:
    """Re-hash `changed` files into the manifest, write it (so every checksum
    passes: only the semantic checks stand between the edit and a process)."""
    for name in changed:
        p = os.path.join(img, name)
        with open(p, "rb") as f:
            data = f.read()
        if isinstance(manifest.get("files"), dict) and name in manifest["files"] \
                and isinstance(manifest["files"][name], dict):
            manifest["files"][name].pop("crc32", None)     # a pages file may carry a sha256 instead
            manifest["files"][name].update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    with open(os.path.join(img, MANIFEST), "w") as f:
        f.write(json.dumps(manifest, indent=1, sort_keys=True))


def _tree_edit(T: dict, rng) -> str:
    """tree.json edited to something no dump makes ("" when it does not apply)."""
    ms = T["members"]
    m = rng.choice(ms)
    others = [x for x in ms if x is not m]
    w = rng.randrange(11)
    if w == 10:
        return _share_edit(ms, rng)
    if w == 0:
        k = rng.choice(["pid", "ppid", "sid", "pgid"])
        m[k] = rng.choice([0, -1, 1 << 31, "1", None, m["pid"] if k == "ppid" else 99999])
        return f"member {ms.index(m)} {k} = {m[k]!r}"
    if w == 1:
        m["dir"] = rng.choice(["../", "/tmp/", "tree/../", "tree/99999/", f"tree/{others[0]['pid']}/", "", None])
        return f"member {ms.index(m)} dir = {m['dir']!r}"
    if w == 2:
        T["root"] = rng.choice([0, ms[1]["pid"], "x"])     # (not others[0]: the root itself when m is not)
        return f"root = {T['root']!r}"
    if w == 3:
        zs = [x for x in ms if "zombie" in x] or [m]
        zs[0]["zombie"] = rng.choice([{"status": -1}, {"status": 1 << 16}, {"status": "7"}, "x", {}])
        return f"zombie = {zs[0]['zombie']!r}"
    if w == 4:
        ms.reverse()
        return "members in reverse order (children before their parent)"
    if w == 5:
        m["exit_signal"] = rng.choice([0, -1, 65, 99, "17"])
        return f"member {ms.index(m)} exit_signal = {m['exit_signal']!r}"
    if w == 6:
        ms.append(dict(rng.choice(ms[1:]), pid=4000001))
        return "a member whose records do not exist"
    if w == 7:
        T["members"] = rng.choice([[], "x", None, [None]])
        return f"members = {T['members']!r}"
    if w == 8:
        live = [x for x in ms[1:] if "zombie" not in x]
        if not live:
            return ""
        live[0]["zombie"] = {"status": 0}
        return "a live member said to be a zombie"
    zs = [x for x in ms if "zombie" in x]
    if not zs:
        return ""
    # itself, or no member (another live member would be a consistent forgery: nothing else records parentage)
    zs[0]["ppid"] = rng.choice([zs[0]["pid"], 4000002])
    return f"the zombie's parent = {zs[0]['ppid']}"


def _share_edit(ms: list, rng) -> str:
    """"share" or "leave" (engine/sharing.py) where no dump writes it. Never one a restore
    could not tell from the truth: taking it from a member with no fds (an
    empty table of its own), or giving "fs" to one with its parent's cwd
    and umask."""
    live = [x for x in ms[1:] if "zombie" not in x and "share" not in x]
    sharers = [x for x in ms if "share" in x]
    zombies = [x for x in ms if "zombie" in x]
    w = rng.randrange(5)
    if w == 4:
        # "leave" on a member no child takes a table from (none has children), or on a zombie
        x = rng.choice([y for y in ms[1:] if not any(c["ppid"] == y["pid"] for c in ms)])
        x["leave"] = rng.choice([["files"], ["fs"], ["files", "fs"]])
        return f"member {x['pid']} leaves a table no child takes"
    if w == 0:
        ms[0]["share"] = rng.choice([["files"], ["fs"]])
        return "the root shares with its parent (outside the tree)"
    if w == 1 and live:
        live[0]["share"] = ["files"]         # it has fds of its own
        return f"member {live[0]['pid']} with fds of its own shares its parent's table"
    if w == 2 and zombies:
        zombies[0]["share"] = ["fs"]
        return "a zombie shares its parent's fs"
    if not sharers:
        return ""
    sharers[0]["share"] = rng.choice([["vm"], "files", [], ["fs", "files"], ["files", "files"], [None], {"files": 1}])
    return f"share = {sharers[0]['share']!r}"


def m_semantic(img, outside, rng):
    tree = os.path.join(img, "tree.json")
    if os.path.exists(tree) and rng.random() < 0.35:
        T = json.load(open(tree))
        desc = _tree_edit(T, rng)
        if not desc:
            return None
        with open(tree, "w") as fh:
            fh.write(json.dumps(T, indent=1, sort_keys=True))
        reseal(img, json.load(open(os.path.join(img, MANIFEST))), ["tree.json"])
        return f"tree.json: {desc}"
    prefix = ""
    if os.path.exists(tree):     # the records of one live member of the tree
        T = json.load(open(tree))
        prefix = rng.choice([m["dir"] for m in T["members"] if "zombie" not in m])
    if rng.random() < 0.15:
        return m_content(img, outside, rng, prefix)
    recs = {k: prefix + v for k, v in RECORDS.items()}
    R = {k: json.load(open(os.path.join(img, v))) for k, v in recs.items()}
    R["manifest"] = json.load(open(os.path.join(img, MANIFEST)))
    for _ in range(8):
        name, f = rng.choice(EDITS)
        try:
            desc = f(R, rng)
        except (IndexError, KeyError, TypeError, ValueError, AttributeError):
            desc = None     # the edit does not fit this member's records
        if desc:
            break
    else:
        return None
    for k, v in recs.items():
        with open(os.path.join(img, v), "w") as fh:
            fh.write(json.dumps(R[k], indent=1, sort_keys=True))
    reseal(img, R["manifest"], list(recs.values()))
    return f"{prefix}{name}: {desc}"


def edit_records(fn: Callable, files=("core.json", "mm.json", "fds.json")):
    """A mutator that applies fn({name: record}, img) to the image's JSON
    records (a tree's too: names relative to the image) and re-hashes them:
    for regression tests of one class of semantic edit."""
    def mutate(img, outside, rng):
        names = list(files)
        R = {n: json.load(open(os.path.join(img, n))) for n in names}
        desc = fn(R, img)
        for n in names:
            with open(os.path.join(img, n), "w") as fh:
                fh.write(json.dumps(R[n], indent=1, sort_keys=True))
        reseal(img, json.load(open(os.path.join(img, MANIFEST))), names)
        return desc or "records edited"
    return mutate

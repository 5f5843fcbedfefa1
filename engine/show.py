"""`ckpt show` and the text rendering of `ckpt check`."""

from __future__ import annotations

import time

from .errors import Refusal
from .image import ImageReader


def show(directory: str) -> dict:
    """Everything an image says, as one dict (the manifest and every JSON
    record file). Reading does not verify checksums; say so in the output."""
    img = ImageReader(directory)
    try:
        img.check_tree()     # not verified, but never read through a symlink or from a file others can write
        out = {"image": img.dir, "manifest": img.manifest, "records": {}}
        for name in sorted(img.files):
            if name.endswith(".json"):
                try:
                    out["records"][name] = img.read_json(name)
                except Refusal as e:
                    if e.reason == "image-unsafe":
                        raise
                    out["records"][name] = {"unreadable": e.detail}
    finally:
        img.close()
    return out


def _size(n) -> str:
    if not isinstance(n, (int, float)):
        return str(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table(rows, headers) -> list:
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return [line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows]


def _plain(key: str, value) -> str:
    """A record field as a person reads it: a path rather than its identity dict."""
    if isinstance(value, dict):
        inner = value.get("file", value.get("ghost", value))
        if isinstance(inner, dict):
            path = inner.get("path") or inner.get("name")
            if path:
                return str(path) + (" (deleted, kept in the image)" if "ghost" in value else "")
    if key == "umask" and isinstance(value, int):
        return f"{value:03o}"
    return str(value)


def render(res: dict) -> str:
    m = res["manifest"]
    files = m.get("files", {})
    total = sum(f.get("size", 0) for f in files.values())
    lines = [f"image      {res['image']}",
             f"format     {m.get('format')}  (engine {m.get('engine')})",
             f"made on    {m.get('arch')} kernel {m.get('kernel')}  "
             f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(m.get('created', 0)))}",
             f"files      {len(files)}, {_size(total)} (checksums are verified by restore, not by show)"]
    recs = res["records"]
    proc = recs.get("process.json") or recs.get("core.json") or {}
    if isinstance(proc, dict) and proc:
        lines.append("")
        lines.append("process")
        for key in ("pid", "comm", "exe", "cwd", "umask", "state"):
            if key in proc:
                lines.append(f"  {key:<8} {_plain(key, proc[key])}")
        sigs = proc.get("signals")
        if isinstance(sigs, dict) and any(sigs.get(q) for q in ("thread", "shared")):
            from .signals import describe
            try:
                lines.append(f"  {'pending':<8} {describe(sigs)}")
            except (KeyError, TypeError):
                lines.append(f"  {'pending':<8} (malformed record)")
        ths = proc.get("threads")
        if isinstance(ths, list) and ths:
            lines.append(f"  {'threads':<8} {len(ths) + 1}: leader {proc.get('pid')}")
            for t in ths:
                if isinstance(t, dict):
                    lines.append(f"    tid {t.get('tid')}  {t.get('comm')!r}")
    mm = recs.get("mm.json")
    vmas = mm.get("vmas") if isinstance(mm, dict) else mm
    if isinstance(vmas, list) and vmas:
        lines.append("")
        lines.append(f"memory: {len(vmas)} mappings")
        rows = []
        for v in vmas:
            if not isinstance(v, dict):
                continue
            start, end = v.get("start", 0), v.get("end", 0)
            saved = v.get("pages_bytes", v.get("saved_bytes", ""))
            backing = v.get("path") or v.get("name") or ""
            seg = v.get("sysv") if v.get("kind") == "sysvshm" else None
            if isinstance(seg, dict):       # a System V segment (engine/sysvshm.py): its id, removed or not
                backing += f" [shmid {seg.get('shmid')}" + (", removed" if isinstance(seg.get("mode"), int)
                                                             and seg["mode"] & 0o1000 else "") + "]"
            rows.append([f"{start:x}-{end:x}" if isinstance(start, int) else start,
                         v.get("perms", ""), _size(end - start) if isinstance(start, int) else "",
                         _size(saved) if saved != "" else "", backing])
        lines += ["  " + r for r in _table(rows, ["range", "perms", "size", "saved", "backing"])]
    fds = recs.get("fds.json")
    fdl = fds.get("fds") if isinstance(fds, dict) else fds
    if isinstance(fdl, list) and fdl:
        lines.append("")
        lines.append(f"fds: {len(fdl)}")
        rows = [[r.get("fd"), r.get("kind"), oct(r.get("flags", 0)), r.get("pos", ""),
                 "cloexec" if r.get("cloexec") else "", r.get("link", "")] for r in fdl if isinstance(r, dict)]
        lines += ["  " + r for r in _table(rows, ["fd", "kind", "flags", "pos", "", "link"])]
    tree = recs.get("tree.json")
    if isinstance(tree, dict) and isinstance(tree.get("members"), list):
        lines.append("")
        lines += _tree_lines(tree["members"], recs)
    others = [n for n in recs if n not in ("process.json", "core.json", "mm.json", "fds.json", "tree.json")
              and not n.startswith("tree/")]
    if others:
        lines.append("")
        lines.append("other records: " + ", ".join(others))
    return "\n".join(lines)


def _tree_lines(members: list, recs: dict) -> list:
    """The process tree (engine/tree.py): one line per member, indented
    under its parent, with its group, session, and what it holds."""
    kids: dict = {}
    for m in members:
        if isinstance(m, dict):
            kids.setdefault(m.get("ppid"), []).append(m)
    lines = [f"process tree: {len(members)} processes"]

    def walk(m: dict, depth: int) -> None:
        d = m.get("dir") or ""
        fds = recs.get(f"{d}fds.json")
        core = recs.get(f"{d}core.json") or {}
        if "zombie" in m:
            st = (m.get("zombie") or {}).get("status", 0)
            what = f"zombie, exit {st >> 8}" if isinstance(st, int) and not st & 0x7f else f"zombie, signal {st}"
        else:
            nth = len(core.get("threads") or []) + 1 if isinstance(core, dict) else 1
            shared = sum(1 for r in fds or [] if isinstance(r, dict) and "ofd_of" in r)
            share = m.get("share") if isinstance(m.get("share"), list) else []
            what = ("its parent's fd table" if "files" in share else
                    f"{len(fds or [])} fds ({shared} shared with an earlier member)") + \
                (", its parent's fs (cwd, umask)" if "fs" in share else "") + \
                (f", {nth} threads" if nth > 1 else "")
        lines.append(f"  {'  ' * depth}{m.get('pid')} {m.get('comm')!s:<15} pgid {m.get('pgid')} sid {m.get('sid')}: {what}")
        for c in kids.get(m.get("pid"), []):
            walk(c, depth + 1)
    if members and isinstance(members[0], dict):
        walk(members[0], 0)
    return lines


def render_check(res: dict) -> str:
    items = res.get("items", [])
    # Mappings that pass are summed up in one line: a CPython process has a
    # hundred of them, and a person reads the check for what fails.
    ok_maps = [i for i in items if i.get("kind") == "mapping" and i.get("verdict") == "ok"]
    rows = [[i.get("what", ""), i.get("kind", ""), i.get("verdict", ""), i.get("detail", "")]
            for i in items if i not in ok_maps]
    if ok_maps:
        by = {}
        for i in ok_maps:
            by[i.get("detail", "")] = by.get(i.get("detail", ""), 0) + 1
        rows.insert(0, [f"{len(ok_maps)} mappings", "mapping", "ok",
                        ", ".join(f"{n} {k}" for k, n in sorted(by.items()))])
    lines = [f"ckpt check: pid {res.get('pid')}: " + ("can be checkpointed" if res.get("ok") else "would be REFUSED")]
    lines += _table(rows, ["what", "kind", "verdict", "detail"])
    for r in res.get("refusals", []):
        lines.append(f"refused: {r.get('message')}")
    return "\n".join(lines)

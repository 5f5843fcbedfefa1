"""Print bench/results.json as one summary table (`make bench` ends with it).

Each benchmark merges its own key into the file (engine, vm, scenarios);
this only reads them, so a partial file prints what it has.
"""

from __future__ import annotations

import json
import sys


def _fmt(v, unit=""):
    if v is None:
        return "-"
    if isinstance(v, float):
        v = f"{v:.3g}" if v < 10 else f"{v:.0f}"
    return f"{v}{unit}"


def rows(res: dict):
    for c in (res.get("engine") or {}).get("cases", []):
        what = f"engine {c.get('touched_mib', 0)} MiB on {c.get('image_on')}"
        if not c.get("touched_mib"):
            what = f"engine small C process on {c.get('image_on')}"
        if c.get("left_running"):
            what += ", dumped --leave-running"
        yield (what, "dump", _fmt(c.get("dump_mib_s"), " MiB/s"), _fmt(c.get("dump_s", 0) * 1000, " ms"))
        yield (what, "restore", _fmt(c.get("restore_mib_s"), " MiB/s"), _fmt(c.get("restore_s", 0) * 1000, " ms"))
        yield (what, "frozen", "", _fmt(c.get("frozen_ms"), " ms"))
        if c.get("durable_ms") is not None:
            yield (what, "dump durable (image fsync'd)", "", _fmt(c.get("durable_ms"), " ms"))
    vm = res.get("vm") or {}
    for arch, v in sorted(vm.items()):
        if not isinstance(v, dict):
            continue
        yield (f"guest {arch}", "boot to first command (cold)", "", _fmt(v.get("boot_to_first_command_cold_s"), " s"))
        yield (f"guest {arch}", "golden snapshot to first command", "", _fmt(v.get("golden_to_first_command_s"), " s"))
        yield (f"guest {arch}", "reset (loadvm + reconnect)", "", _fmt(v.get("reset_s"), " s"))
        yield (f"guest {arch}", "command latency", "", _fmt(v.get("command_latency_s"), " s"))
    for cell, sc in sorted((res.get("scenarios") or {}).items()):
        if not isinstance(sc, dict):
            continue
        corpus = sc.get("corpus") or {}
        if corpus:
            yield (f"scenarios {cell}", f"corpus, {corpus.get('workers')} workers",
                   _fmt(corpus.get("scenarios_per_minute"), " /min"), _fmt(corpus.get("wall_s"), " s"))
        if sc.get("reset_s"):
            yield (f"scenarios {cell}", "reset between scenarios (median)", "", _fmt(sc["reset_s"].get("median"), " s"))
        if (sc.get("reset_agent_s") or {}).get("median") is not None:
            yield (f"scenarios {cell}", "reset, steps through the agent (median)", "",
                   _fmt(sc["reset_agent_s"]["median"], " s"))
        if corpus.get("median_s") is not None:
            yield (f"scenarios {cell}", f"corpus: one scenario (median; engine "
                   f"{_fmt((corpus.get('step_median_s') or {}).get('engine'), ' s')}, max "
                   f"{_fmt(corpus.get('max_s'), ' s')}, ckpt {_starts(corpus)})", "", _fmt(corpus["median_s"], " s"))
        named = {"ssh": "steps over SSH, ckpt exec'd", "agent_exec": "steps through the agent, ckpt exec'd",
                 "agent_warm": "steps through the agent, ckpt warm", "agent": "steps through the agent"}
        for mode, ps in sorted((sc.get("per_scenario") or {}).items()):
            if isinstance(ps, dict) and ps.get("median_s") is not None:
                yield (f"scenarios {cell}", f"one scenario, {named.get(mode, mode)} (median; engine "
                       f"{_fmt((ps.get('step_median_s') or {}).get('engine'), ' s')}, load {ps.get('load_avg_1m')})",
                       "", _fmt(ps["median_s"], " s"))
        mig = sc.get("migrate") or {}
        if mig.get("median_s") is not None:
            yield (f"scenarios {cell}", f"restore on another guest (median; image across "
                   f"{_fmt((mig.get('step_median_s') or {}).get('migrate'), ' s')}, other guest's reset "
                   f"{_fmt((mig.get('step_median_s') or {}).get('other_guest'), ' s')})", "", _fmt(mig["median_s"], " s"))


def _starts(d: dict) -> str:
    st = d.get("engine_start") or {}
    return ", ".join(f"{k} {v}" for k, v in sorted(st.items())) or "-"


def _ms(s):
    return "-" if s is None else f"{s * 1000:.0f} ms"


def compare_rows(res: dict):
    """ckpt against criu (bench/compare.py), one line per case and step:
    both medians and the speed ratio (criu time / ckpt time: > 1 is ckpt
    faster; issue 15 asks for >= 1.5 on every row)."""
    for cell, doc in sorted((res.get("compare") or {}).items()):
        if not isinstance(doc, dict):
            continue
        criu = (doc.get("criu_version") or "?").replace("Version: ", "criu ")
        if doc.get("criu_unavailable"):
            criu = "no criu: ckpt alone"
        for r in doc.get("rows", []) + doc.get("swarm_rows", []):
            case = r.get("case") or f"{r.get('touched_mib')} MiB"
            what = f"{cell} ({criu}): {case} on {r.get('image_on')}"
            for step in ("dump", "restore"):
                ratio = r.get(f"{step}_speed_ckpt_over_criu")
                yield (what, step, _ms(r.get(f"ckpt_{step}_s")), _ms(r.get(f"criu_{step}_s")),
                       "-" if ratio is None else f"{ratio:.2f}x")
            if r.get("criu_dump_durable_s") is not None:
                ratio = r.get("dump_durable_speed_ckpt_over_criu")
                yield (what, "dump, image made durable (criu: + fsync of its files)", _ms(r.get("ckpt_dump_s")),
                       _ms(r["criu_dump_durable_s"]), "-" if ratio is None else f"{ratio:.2f}x")
            for step in ("dump", "restore"):
                if r.get(f"ckpt_base_{step}_s") is not None:
                    ratio = r.get(f"{step}_speed_ckpt_over_base")
                    yield (what, f"{step} (criu column: ckpt_base, the older engine)",
                           _ms(r.get(f"ckpt_{step}_s")), _ms(r[f"ckpt_base_{step}_s"]),
                           "-" if ratio is None else f"{ratio:.2f}x")
            if r.get("ckpt_frozen_ms") is not None or r.get("criu_frozen_ms") is not None:
                ratio = r.get("frozen_speed_ckpt_over_criu")
                frozen = [None if r.get(f"{t}_frozen_ms") is None else r[f"{t}_frozen_ms"] / 1000
                          for t in ("ckpt", "criu")]
                yield (what, "frozen" + (" (left running: until it runs again)" if r.get("leave_running") else ""),
                       _ms(frozen[0]), _ms(frozen[1]), "-" if ratio is None else f"{ratio:.2f}x")
            if r.get("ckpt_durable_ms") is not None:
                yield (what, "ckpt: image durable (fsync'd) after", _ms(r["ckpt_durable_ms"] / 1000), "-", "-")


def _print(table) -> None:
    widths = [max(len(str(r[i])) for r in table) for i in range(len(table[0]))]
    for n, r in enumerate(table):
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def main(argv) -> int:
    path = argv[1] if len(argv) > 1 else "bench/results.json"
    try:
        with open(path) as f:
            res = json.load(f)
    except (OSError, ValueError) as e:
        print(f"bench/table.py: cannot read {path}: {e}", file=sys.stderr)
        return 2
    _print([("what", "measure", "rate", "time")] + list(rows(res)))
    cmp = list(compare_rows(res))
    if cmp:
        print("\nckpt against criu, same processes, same machine, one run (wall time incl. start-up; "
              "speed = criu time / ckpt time; ckpt's dump includes fsync, criu's does not)")
        _print([("case", "step", "ckpt", "criu", "speed")] + cmp)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""Medians of the fifteenth session's A/B runs, as BENCHMARKS.md quotes them.

    python3 summarize.py bulk bulk-off bulk-seal
    python3 summarize.py bulk bulk-oldclient bulk-newclient
    python3 summarize.py latency lat-old lat-new
"""
import collections
import glob
import json
import os
import statistics as st
import sys

here = os.path.dirname(os.path.abspath(__file__))


def runs(prefix):
    return sorted(glob.glob(os.path.join(here, prefix + "-r*", "results.json")))


def bulk(sets):
    res = collections.defaultdict(list)
    for name in sets:
        for f in runs(name):
            for r in json.load(open(f))["scenarios"]["bulk"]["rows"]:
                if r["baseline"] and "ssh" not in r["route"]:
                    continue
                cpu = r["cpu_s_per_gib"]
                per = {p["process"]: p for p in r.get("per_mib", [])}
                client = per.get("bench client+backend", {})
                res[(name, r["route"], r["direction"])].append(
                    (r["mib_per_s"], cpu.get("spoke-server", 0), cpu.get("spoke-agent", 0),
                     cpu.get("bench client+backend", 0), client.get("syscalls", 0),
                     r.get("busy_cores", 0)))
    for route, d in sorted({k[1:] for k in res}):
        line = f"{route[:27]:27s} {d[:4]}"
        for name in sets:
            xs = res.get((name, route, d))
            if xs:
                m = [st.median(x[i] for x in xs) for i in range(6)]
                line += (f" | {name} n={len(xs)} {m[0]:5.0f} MiB/s [{min(x[0] for x in xs):.0f}-"
                         f"{max(x[0] for x in xs):.0f}] server {m[1]:.2f} agent {m[2]:.2f} "
                         f"bench {m[3]:.2f} s/GiB, bench {m[4]:.1f} syscalls/MiB, busy {m[5]:.2f}")
        print(line)


def latency(sets):
    res = collections.defaultdict(list)
    for name in sets:
        for f in runs(name):
            j = json.load(open(f))["scenarios"]["latency"]
            for rows, counts, tag in (("rows", "per_round_trip", "unpinned"),
                                      ("rows_one_cpu", "per_round_trip_one_cpu", "pinned")):
                for r in j[rows]:
                    res[(name, tag, r["route"])].append((r["added_p50_us"], r["added_p99_us"]))
                for r in j[counts]:
                    for p in r["processes"]:
                        if p["process"].startswith("bench"):
                            res[(name, tag + "/bench", r["route"])].append((p["cpu_us"], p["syscalls"]))
    for tag in ("unpinned", "pinned"):
        print(tag)
        for route in sorted({k[2] for k in res}):
            line = f" {route[:28]:28s}"
            for name in sets:
                xs, cs = res.get((name, tag, route)), res.get((name, tag + "/bench", route))
                if xs:
                    line += (f" | {name} added p50 {st.median(x[0] for x in xs):6.1f} "
                             f"p99 {st.median(x[1] for x in xs):6.1f}")
                if cs:
                    line += (f" bench {st.median(c[0] for c in cs):5.1f} µs "
                             f"{st.median(c[1] for c in cs):4.1f} syscalls")
            print(line)


if __name__ == "__main__":
    {"bulk": bulk, "latency": latency}[sys.argv[1]](sys.argv[2:])

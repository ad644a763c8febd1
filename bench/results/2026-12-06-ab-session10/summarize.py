# Summarises the tenth session's A/B latency runs: per variant, the median over runs of
# (pinned added p50, unpinned added p50 minus ssh's, pinned spoke-server context switches and CPU µs per round trip).
import json, statistics, sys
ROUTES = ["spoke http-connect/uds", "spoke http-connect/mtls-tcp", "spoke grpc/uds", "spoke grpc/mtls-tcp"]
def stats(d):
    l = json.load(open(f"{d}/results.json"))["scenarios"]["latency"]
    ssh = next(r for r in l["rows"] if r["route"].startswith("ssh"))["added_p50_us"]
    out = {}
    for route in ROUTES:
        un = next(r for r in l["rows"] if r["route"] == route)["added_p50_us"] - ssh
        pin = next(r for r in l["rows_one_cpu"] if r["route"] == route)["added_p50_us"]
        srv = next(p for c in l["per_round_trip_one_cpu"] if c["route"] == route for p in c["processes"] if p["process"] == "spoke-server")
        out[route] = (pin, un, srv["context_switches"], srv["cpu_us"])
    return out
for variant in sys.argv[1:]:
    pref, n = variant.split(":")
    runs = [stats(f"{pref}-r{i}") for i in range(1, int(n) + 1)]
    print(f"== {pref}")
    for route in ROUTES:
        med = [statistics.median(r[route][k] for r in runs) for k in range(4)]
        print(f"{route:30} pinned p50 {med[0]:5.1f}  unpinned p50 vs ssh {med[1]:+6.1f}  server switches/rt (pinned) {med[2]:4.2f}  server CPU µs/rt (pinned) {med[3]:5.1f}")

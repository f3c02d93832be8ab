#!/usr/bin/env python3
"""The runs behind bench/load.sh: start each server pinned to core 0, drive it with oha pinned
to core 1, take medians, print the table with ratios to the floor and the targets of issues 5
and 18. Every loop is bounded: each oha run lasts SECONDS, each server start waits at most 5 s.

Besides req/s it reads each server's CPU time (utime + stime in /proc/PID/stat) around every
run, so the table says how much CPU one review costs and what share of it the floor's stack is:
a figure that holds on a shared machine, where req/s moves with the neighbours.

Environment: PROFILE (release; or dist) picks target/PROFILE/; WEBHOOK and FLOOR override the
binaries (to measure another build with the same runs); BODY posts another review file; CELLS
limits the rows, as "http1:16,new-conn:16"."""

import json
import os
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OHA = os.environ.get("OHA") or os.path.join(ROOT, "target/bench-tools/bin/oha")
PROFILE = os.environ.get("PROFILE") or "release"
WEBHOOK = os.environ.get("WEBHOOK") or os.path.join(ROOT, "target", PROFILE, "outpost-webhook")
FLOOR = os.environ.get("FLOOR") or os.path.join(ROOT, "target", PROFILE, "examples/floor")
CERTS = os.path.join(ROOT, "target/bench/certs")
BODY = os.environ.get("BODY") or os.path.join(ROOT, "tests/fixtures/admissionreview-public-deployment-create.json")
SECONDS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
REPEATS = int(sys.argv[2]) if len(sys.argv) > 2 else 3
MODES = [("http1", []), ("http2", ["--http2"]), ("new-conn", ["--disable-keepalive"])]
CONNS = [1, 16, 64]
CELLS = [tuple(c.split(":")) for c in os.environ.get("CELLS", "").split(",") if c]
TICKS = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(port, path):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            return int(s.recv(64).split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def start(kind):
    """Starts a server pinned to core 0; returns (process, port, milliseconds to ready)."""
    port = free_port()
    cert, key = os.path.join(CERTS, "tls.crt"), os.path.join(CERTS, "tls.key")
    if kind == "webhook":
        health = free_port()
        cmd = [WEBHOOK, "serve", f"--addr=127.0.0.1:{port}", f"--health-addr=127.0.0.1:{health}",
               f"--tls-cert={cert}", f"--tls-key={key}", "--log-level=warn", "--cluster=off"]
        # oha is one client address: give it the port, as the floor has (a build from before
        # the per-peer limits has no such flags).
        if "--max-pending-per-peer" in subprocess.run([WEBHOOK, "serve", "--help"], capture_output=True, text=True).stdout:
            cmd += ["--max-connections-per-peer=128", "--max-pending-per-peer=128"]
        ready = lambda: http_status(health, "/readyz") == 200
    else:
        cmd = [FLOOR, f"127.0.0.1:{port}", cert, key]
        ready = lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0
    began = time.monotonic()
    proc = subprocess.Popen(["taskset", "-c", "0", *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not ready():
        if time.monotonic() - began > 5 or proc.poll() is not None:
            proc.kill()
            sys.exit(f"load.py: {kind} did not become ready")
        time.sleep(0.0005)
    return proc, port, (time.monotonic() - began) * 1000


def hwm_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid):
    """User and system CPU time of `pid` so far, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def oha(port, conns, flags, pid):
    cmd = ["taskset", "-c", "1", OHA, "-z", f"{SECONDS}s", "-c", str(conns), "-m", "POST",
           "-H", "content-type: application/json", "-D", BODY,
           "--cacert", os.path.join(CERTS, "ca.crt"), "--no-tui", "--output-format", "json", *flags,
           f"https://127.0.0.1:{port}/mutate?timeout=10s"]
    cpu_before = cpu_seconds(pid)
    out = json.loads(subprocess.run(cmd, check=True, capture_output=True, timeout=SECONDS + 60).stdout)
    cpu = cpu_seconds(pid) - cpu_before
    codes = out.get("statusCodeDistribution", {})
    answered = sum(codes.values())
    # oha cuts the requests in flight when -z runs out; those are not failures of the server.
    errors = {k: n for k, n in out.get("errorDistribution", {}).items() if k != "aborted due to deadline"}
    lat = out["latencyPercentiles"]
    return {
        "rps": out["summary"]["requestsPerSec"],
        "p50": lat["p50"] * 1000, "p99": lat["p99"] * 1000, "p999": lat["p99.9"] * 1000,
        "cpu_us": cpu / max(answered, 1) * 1e6,
        "non200": sum(n for c, n in codes.items() if c != "200"),
        "errors": sum(errors.values()),
    }


def median(runs, key):
    return statistics.median(r[key] for r in runs)


def main():
    results, startups = [], []
    for mode, flags in MODES:
        for conns in CONNS:
            if CELLS and (mode, str(conns)) not in CELLS:
                continue
            row = {"mode": mode, "conns": conns}
            servers = {k: start(k) for k in ("webhook", "floor")}
            startups.append(servers["webhook"][2])
            runs = {"webhook": [], "floor": []}
            for _ in range(REPEATS):
                for kind, (proc, port, _) in servers.items():
                    runs[kind].append(oha(port, conns, flags, proc.pid))
            for kind, (proc, _, _) in servers.items():
                r = runs[kind]
                row[kind] = {k: median(r, k) for k in ("rps", "p50", "p99", "p999", "cpu_us")}
                row[kind]["failed"] = sum(x["non200"] + x["errors"] for x in r)
                row[kind]["hwm_mib"] = hwm_kib(proc.pid) / 1024
                proc.terminate()
                proc.wait(timeout=30)
            row["ratio"] = row["webhook"]["rps"] / row["floor"]["rps"]
            row["share"] = row["floor"]["cpu_us"] / row["webhook"]["cpu_us"]
            results.append(row)
            print(f"  {mode:8} c={conns:<3} webhook {row['webhook']['rps']:9.0f} req/s  "
                  f"floor {row['floor']['rps']:9.0f} req/s  ratio {row['ratio']:.2f}  "
                  f"CPU/review {row['webhook']['cpu_us']:.1f} us, floor {row['floor']['cpu_us']:.1f} us, "
                  f"share {row['share']:.2f}", file=sys.stderr)

    print(f"\noutpost-webhook vs floor, {SECONDS} s x {REPEATS} runs each (medians), body "
          f"{os.path.getsize(BODY)} B, server on core 0, oha on core 1\n")
    print("| mode | conns | webhook req/s | floor req/s | ratio | webhook CPU us/req | floor CPU us/req | share | p50 ms | p99 ms | p99.9 ms | floor p99 ms | webhook VmHWM MiB | floor VmHWM MiB | failed |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        w, f = r["webhook"], r["floor"]
        print(f"| {r['mode']} | {r['conns']} | {w['rps']:.0f} | {f['rps']:.0f} | {r['ratio']:.2f} | "
              f"{w['cpu_us']:.1f} | {f['cpu_us']:.1f} | {r['share']:.2f} | "
              f"{w['p50']:.3f} | {w['p99']:.3f} | {w['p999']:.3f} | {f['p99']:.3f} | {w['hwm_mib']:.1f} | "
              f"{f['hwm_mib']:.1f} | {w['failed'] + f['failed']} |")
    startup = statistics.median(startups)
    print(f"\nstartup to ready (spawn to /readyz 200, certificate files given): median {startup:.1f} ms "
          f"over {len(startups)} starts\n")

    os.makedirs(os.path.join(ROOT, "target/bench"), exist_ok=True)
    with open(os.path.join(ROOT, "target/bench/load.json"), "w") as f:
        json.dump({"seconds": SECONDS, "repeats": REPEATS, "results": results, "startup_ms": startup}, f, indent=1)

    def find(mode, conns):
        return next((r for r in results if r["mode"] == mode and r["conns"] == conns), None)

    if any(find(m, c) is None for m in ("http1", "http2", "new-conn") for c in (16, 64)):
        share = find("http1", 16)
        if share:
            print(f"{'met ' if share['share'] >= 0.4 else 'MISS'}  HTTP/1.1 c16 CPU share >= 40%: {share['share']:.2f}")
        return
    checks = [
        ("HTTP/1.1 c16 CPU per review <= 2.5x the floor's (share >= 40%)", find("http1", 16)["share"] >= 0.4, f"share {find('http1', 16)['share']:.2f}"),
        ("HTTP/1.1 c16 req/s >= 35% of the floor", find("http1", 16)["ratio"] >= 0.35, f"{find('http1', 16)['ratio']:.2f}"),
        ("HTTP/1.1 c16 p99 <= 1 ms", find("http1", 16)["webhook"]["p99"] <= 1, f"{find('http1', 16)['webhook']['p99']:.3f} ms"),
        ("HTTP/2 c16 p99 <= 1 ms", find("http2", 16)["webhook"]["p99"] <= 1, f"{find('http2', 16)['webhook']['p99']:.3f} ms"),
        ("RSS <= 16 MiB at 64 connections", max(find(m, 64)["webhook"]["hwm_mib"] for m, _ in MODES) <= 16,
         f"{max(find(m, 64)['webhook']['hwm_mib'] for m, _ in MODES):.1f} MiB"),
        ("new connection per request c16 >= 80% of the floor", find("new-conn", 16)["ratio"] >= 0.8, f"{find('new-conn', 16)['ratio']:.2f}"),
        ("startup to ready <= 50 ms", startup <= 50, f"{startup:.1f} ms"),
        ("no failed request", all(r["webhook"]["failed"] + r["floor"]["failed"] == 0 for r in results), ""),
    ]
    for name, ok, value in checks:
        print(f"{'met ' if ok else 'MISS'}  {name}: {value}")


if __name__ == "__main__":
    main()

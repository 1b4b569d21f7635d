"""esl-gateway benchmark: figures measured side by side with a raw gevent baseline, in one run.

    .venv/bin/python tests/benchmark.py            # everything (several minutes)
    .venv/bin/python tests/benchmark.py --quick    # shorter steps, for a smoke run

The baseline is the Python limit: two forked gevent processes on one shared socket doing the same
byte exchange as the example IVR (connect, linger, myevents, answer, playback, hangup) with no
parsing at all, only byte searches. Both servers are driven by the same load generator
(``esl-gateway loadtest``, several processes) on the same 2-core machine, so the ratios are what
matter; absolute figures depend on the machine and what else runs on it.

Prints a table and one JSON line. Not collected by pytest (the name does not start with test_).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.gateway_process import GatewayProcess, gateway_command  # noqa: E402

STEP = 250
# CPU per call: the servers are loaded at once (CPU_RATE calls/s each), because this machine's
# speed drifts by tens of percent within a minute; the round with the median ratio is the figure.
# Three servers: the gateway, the gateway without call survival, the raw baseline.
CPU_ROUNDS = 5
CPU_RATE = 150
MAX_RATE = 3000
OPEN_FILES = 65536


# ------------------------------------------------------------------------------------------
# The raw baseline: same bytes, no parsing
# ------------------------------------------------------------------------------------------

def raw_server(sock: socket.socket) -> None:
    """Serve the example IVR's byte exchange on ``sock`` with plain gevent (runs forked)."""
    from gevent import monkey
    monkey.patch_all()
    from gevent.server import StreamServer

    def read_until(conn, buffer: bytearray, needle: bytes, count: int = 1) -> bool:
        while buffer.count(needle) < count:
            data = conn.recv(65536)
            if not data:
                return False
            buffer += data
        return True

    def handle(conn, _address):
        buffer = bytearray()
        steps = [(b"connect\n\n", b"\n\n", 1), (b"linger 10\n\n", b"+OK will linger", 1),
                 (b"myevents\n\n", b"+OK Events Enabled", 1)]
        for app in (b"answer", b"playback"):
            event_uuid = str(uuid.uuid4()).encode()
            steps.append((b"sendmsg\ncall-command: execute\nexecute-app-name: " + app +
                          (b"\nexecute-app-arg: prompt.wav" if app == b"playback" else b"") +
                          b"\nEvent-UUID: " + event_uuid + b"\n\n",
                          b"Application-UUID: " + event_uuid, 2))
        steps.append((b"sendmsg\ncall-command: hangup\nhangup-cause: NORMAL_CLEARING\n\n",
                      b"CHANNEL_HANGUP_COMPLETE", 1))
        try:
            for command, needle, count in steps:
                conn.sendall(command)
                if not read_until(conn, buffer, needle, count):
                    return
                del buffer[:buffer.rfind(needle) + len(needle)]
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(65536):
                pass
        except OSError:
            pass
        finally:
            conn.close()

    server = StreamServer(sock, handle)
    server.max_accept = 1
    server.serve_forever()


def start_raw(workers: int = 2):
    sock = socket.create_server(("127.0.0.1", 0), backlog=2048)
    sock.setblocking(False)
    pids = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            try:
                raw_server(sock)
            finally:
                os._exit(0)
        pids.append(pid)
    return sock, pids


# ------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------

def cpu_times(pids) -> tuple[float, float]:
    """User and kernel CPU seconds of ``pids``, those still running."""
    user = system = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11])
        system += int(fields[12])
    ticks = os.sysconf("SC_CLK_TCK")
    return user / ticks, system / ticks


def cpu_seconds(pids) -> float:
    return sum(cpu_times(pids))


def loadtest_command(address, *args) -> list[str]:
    return [*gateway_command(), "loadtest", "%s:%d" % address, "--json", *args]


def children_cpu() -> float:
    times = os.times()
    return times.children_user + times.children_system


def loadtest(address, *args) -> tuple[dict, float]:
    """Run `esl-gateway loadtest --json`; returns its summary and the generator's CPU seconds."""
    before = children_cpu()
    output = subprocess.run(loadtest_command(address, *args), capture_output=True, text=True,
                            timeout=900)
    return json.loads(output.stdout), children_cpu() - before


def max_clean_rate(address, seconds: float, procs: int) -> tuple[float, list]:
    """The highest rate actually offered (steps of 250 calls/s asked) with every call completed.

    When the generator cannot offer the rate asked (it shares the cores), the rate it did offer
    is the figure, and the step is marked generator-bound: the server was not the limit.
    """
    best, steps = 0.0, []
    for rate in range(STEP, MAX_RATE + 1, STEP):
        view, _ = loadtest(address, "--rate", str(rate), "--duration", str(seconds),
                           "--procs", str(procs), "--connect-wait", "10")
        clean = view["outcomes"]["completed"] == view["calls"]
        generator_bound = view["offered_rate"] < rate * 0.95
        steps.append({"rate": rate, "offered": view["offered_rate"], "clean": clean,
                      "generator_bound": generator_bound,
                      "first_byte_p99_ms": view["first_byte_ms"]["p99"]})
        if not clean:
            break
        best = max(best, view["offered_rate"])
        if generator_bound:
            break   # the generator, not the server, is the limit from here
    return best, steps


def cpu_side_by_side(targets, rate: int, seconds: float, procs: int
                     ) -> tuple[list[tuple[float, float]], float]:
    """CPU seconds per completed call of each (address, pids_of) server, all loaded at the same
    time by generators of their own, so the machine's drifting speed weighs on them alike, as
    (all, of which in the kernel); and the generators' CPU seconds per call."""
    before = [cpu_times(pids_of()) for _, pids_of in targets]
    generators_before = children_cpu()
    runs = [subprocess.Popen(loadtest_command(address, "--rate", str(rate), "--duration",
                                              str(seconds), "--procs", str(procs)),
                             stdout=subprocess.PIPE, text=True) for address, _ in targets]
    calls = [max(json.loads(run.communicate(timeout=900)[0])["outcomes"]["completed"], 1)
             for run in runs]
    servers = []
    for (_, pids_of), (user, system), count in zip(targets, before, calls):
        user_now, system_now = cpu_times(pids_of())
        servers.append(((user_now - user + system_now - system) / count,
                        (system_now - system) / count))
    return servers, (children_cpu() - generators_before) / sum(calls)


def latency(address, rate: int, seconds: float) -> dict:
    view, _ = loadtest(address, "--rate", str(rate), "--duration", str(seconds), "--procs", "2")
    return view["first_byte_ms"]


def responsive_at(address, rate: int, seconds: float, runs: int) -> list[dict]:
    """``runs`` runs at ``rate``: what FreeSWITCH would see in each (failures, first byte)."""
    figures = []
    for _ in range(runs):
        view, _ = loadtest(address, "--rate", str(rate), "--duration", str(seconds),
                           "--procs", "2", "--connect-wait", "10")
        figures.append({"errors": view["calls"] - view["outcomes"]["completed"],
                        "offered": view["offered_rate"],
                        "first_byte_p99_ms": view["first_byte_ms"]["p99"]})
    return figures


HELD_LONG = ("--scenario", "long", "--hold", "30")
# The example IVR inside a 25-s playback: its events (real-shaped, as the simulator sends them)
# wait unread in the session until the handler reads them at the end of the call.
HELD_IVR = ("--scenario", "ivr", "--playback-ms", "25000")


def held_calls(gateway: GatewayProcess, calls: int, procs: int,
               scenario: tuple[str, ...]) -> tuple[float, float]:
    """RSS growth of the gateway's whole process tree per concurrent call of ``scenario``
    (loadtest arguments), against the tree warmed up by a few hundred short calls; and the
    tree's CPU seconds per call over the whole run, which must not grow with the number of
    calls held (a cost per open call paid at each call's end would)."""
    loadtest(gateway.address, "--calls", "500", "--rate", "250", "--procs", str(procs))
    pids = every_pid(gateway)
    before = sum(rss(pid) for pid in pids)
    cpu_before = cpu_seconds(pids)
    load = subprocess.Popen(loadtest_command(gateway.address, *scenario, "--calls", str(calls),
                                             "--rate", "1000", "--procs", str(procs)),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    peak = before
    deadline = time.monotonic() + 25
    while time.monotonic() < deadline:
        time.sleep(1)
        active = sum(w["calls_active"] for w in gateway.stats()["workers"])
        peak = max(peak, sum(rss(pid) for pid in every_pid(gateway)))
        if active >= calls * 0.99:
            break
    completed = json.loads(load.communicate(timeout=120)[0])["outcomes"]["completed"]
    return (peak - before) / calls, (cpu_seconds(every_pid(gateway)) - cpu_before) / completed


def cpu_stolen() -> tuple[int, int]:
    """The machine's (stolen, all) CPU ticks so far: what the hypervisor gave other guests."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[7], sum(fields[:8])


def rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def replacement_time(gateway: GatewayProcess, tries: int = 5) -> float:
    """Seconds from SIGKILL of a worker to its replacement taking a call (median of ``tries``):
    the generation's spare if it has one, else a worker its fork server forks."""
    times = []
    for _ in range(tries):
        victim = gateway.worker_pids()[0]
        others = set(gateway.worker_pids()) - {victim}
        for pid in others:
            os.kill(pid, signal.SIGSTOP)   # so only the replacement can take the probe call
        try:
            killed = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            with socket.create_connection(gateway.address, timeout=10) as probe:
                probe.settimeout(10)
                assert probe.recv(64).startswith(b"connect")
                times.append(time.monotonic() - killed)
        finally:
            for pid in others:
                os.kill(pid, signal.SIGCONT)
        time.sleep(1.5)
    return sorted(times)[len(times) // 2]


def proxy_cost(open_files: int, seconds: float, procs: int) -> dict:
    """CPU per call the proxy adds: a raw backend called directly, and another called through a
    gateway in proxy mode (the path's CPU: proxy and backend), both loaded at once (CPU_ROUNDS
    rounds, the median)."""
    direct_sock, direct_pids = start_raw()
    backend_sock, backend_pids = start_raw()
    proxy = start_gateway(Path(tempfile.mkdtemp(prefix="esl-bench-")), open_files, "--proxy",
                          "%s:%d" % backend_sock.getsockname(), app="")
    try:
        targets = [(direct_sock.getsockname(), lambda: direct_pids),
                   (proxy.address, lambda: every_pid(proxy) + backend_pids)]
        rounds = []
        for _ in range(CPU_ROUNDS):
            ((direct, direct_kernel), (through, through_kernel)), _ = cpu_side_by_side(
                targets, CPU_RATE, seconds, procs)
            rounds.append({"direct_ms": 1000 * direct, "through_ms": 1000 * through,
                           "added_ms": 1000 * (through - direct), "ratio": through / direct,
                           "kernel_added_ms": 1000 * (through_kernel - direct_kernel)})
        return sorted(rounds, key=lambda r: r["added_ms"])[CPU_ROUNDS // 2] | {"rounds": rounds}
    finally:
        proxy.stop()
        for pid in direct_pids + backend_pids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        direct_sock.close()
        backend_sock.close()


def framer_share(others, open_files: int, seconds: float, procs: int) -> dict:
    """One more CPU round, beside the ``others`` targets, with a gateway whose workers time their
    framer (tests/apps/timed_framer.py): the framer's share of the gateway's CPU, measured where
    it runs, under the rounds' own load. (The timing itself adds two clock reads per read and a
    write per call to the gateway's CPU: the share comes out a little low, if anything.)"""
    directory = Path(tempfile.mkdtemp(prefix="esl-bench-framer-"))
    timed = start_gateway(Path(tempfile.mkdtemp(prefix="esl-bench-")), open_files,
                          app="timed_framer:handle", env={"TIMED_FRAMER_DIR": str(directory)})
    try:
        framed_before, cpu_before = framer_seconds(directory), cpu_seconds(every_pid(timed))
        ((per_call, _), *_), _ = cpu_side_by_side(
            [(timed.address, lambda: every_pid(timed)), *others], CPU_RATE, seconds, procs)
        share = ((framer_seconds(directory) - framed_before)
                 / (cpu_seconds(every_pid(timed)) - cpu_before))
        return {"share": share, "ms_per_call": 1000 * share * per_call}
    finally:
        timed.stop()


def framer_seconds(directory: Path) -> float:
    """The CPU seconds the timed workers have spent framing so far (each writes its total)."""
    return sum(float(path.read_text() or 0) for path in directory.iterdir())


def sporadic_crashes(open_files: int, rate: int, runs: int, survival: str) -> list[dict]:
    """1 % of calls os._exit their worker, 10 % raise, at ``rate`` for 10 s, ``runs`` times
    (tests/apps/faulty.py): what FreeSWITCH sees."""
    figures = []
    for _ in range(runs):
        gateway = start_gateway(Path(tempfile.mkdtemp(prefix="esl-bench-")), open_files,
                                "--call-survival", survival, app="faulty:handle")
        try:
            view, _ = loadtest(gateway.address, "--rate", str(rate), "--duration", "10",
                               "--procs", "2")
            totals = gateway.stats()["totals"]
            figures.append({"first_byte_p99_ms": view["first_byte_ms"]["p99"],
                            "completed": view["outcomes"]["completed"], "calls": view["calls"],
                            "refused": view["outcomes"]["refused"],
                            "timeout": view["outcomes"]["timeout"],
                            "deaths": totals["worker_deaths"], "lost": totals["calls_lost"]})
        finally:
            gateway.stop()
    return figures


def every_pid(gateway: GatewayProcess) -> list[int]:
    """The master and all its children: workers, the spare, the fork server."""
    return [gateway.pid, *gateway.worker_pids(r"\w+")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_gateway(workdir: Path, open_files: int, *args: str,
                  app: str = "gateway.examples.ivr:handle", env: dict | None = None
                  ) -> GatewayProcess:
    """The gateway with the example app (or ``app``, "" with --proxy), quiet (warnings only),
    ready when /healthz says so."""
    port, stats_port = free_port(), free_port()
    gateway = GatewayProcess(workdir, app, 2,
                             ["-b", f"127.0.0.1:{port}", "--stats", f"127.0.0.1:{stats_port}",
                              "--worker-connections", "6000", "--log-level", "warning", *args],
                             env=env, max_open_files=open_files).start(wait_ready=False)
    gateway.address, gateway.stats_address = ("127.0.0.1", port), ("127.0.0.1", stats_port)
    deadline = time.monotonic() + 30
    while True:
        try:
            if gateway.http_get("/healthz")[0] == 200:
                return gateway
        except OSError:
            pass   # not listening yet
        if time.monotonic() > deadline:
            raise RuntimeError(f"the gateway did not become ready:\n{gateway.log()}")
        time.sleep(0.1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    parser.add_argument("--procs", type=int, default=2, help="load generator processes")
    args = parser.parse_args()
    # 10 000 held calls need that many sockets, split over the processes (which inherit this).
    open_files = min(OPEN_FILES, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))
    seconds = 3 if args.quick else 10
    results = {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count()}
    stolen_before, ticks_before = cpu_stolen()
    workdir = Path(tempfile.mkdtemp(prefix="esl-bench-"))
    gateway = start_gateway(workdir, open_files)
    unsurviving = start_gateway(Path(tempfile.mkdtemp(prefix="esl-bench-")), open_files,
                                "--call-survival", "off", "--spare-workers", "0")
    raw_sock, raw_pids = start_raw()
    raw_address = raw_sock.getsockname()
    try:
        results["max_rate"], results["rate_steps"] = max_clean_rate(gateway.address, seconds,
                                                                    args.procs)
        results["raw_max_rate"], results["raw_rate_steps"] = max_clean_rate(
            raw_address, seconds, args.procs)
        targets = [(gateway.address, lambda: every_pid(gateway)),
                   (unsurviving.address, lambda: every_pid(unsurviving)),
                   (raw_address, lambda: raw_pids)]
        results["cpu_rounds"] = []
        for _ in range(CPU_ROUNDS):
            ((ours, ours_kernel), (off, _), (raw, raw_kernel)), generator = cpu_side_by_side(
                targets, CPU_RATE, seconds, args.procs)
            results["cpu_rounds"].append({"gateway_ms": 1000 * ours, "raw_ms": 1000 * raw,
                                          "gateway_kernel_ms": 1000 * ours_kernel,
                                          "raw_kernel_ms": 1000 * raw_kernel,
                                          "no_survival_ms": 1000 * off, "ratio": ours / raw,
                                          "survival_ratio": ours / off,
                                          "generator_ms": 1000 * generator})
        median = sorted(results["cpu_rounds"], key=lambda c: c["ratio"])[CPU_ROUNDS // 2]
        results["cpu_ms_per_call"] = median["gateway_ms"]
        results["raw_cpu_ms_per_call"] = median["raw_ms"]
        results["no_survival_cpu_ms_per_call"] = median["no_survival_ms"]
        results["generator_cpu_ms_per_call"] = median["generator_ms"]
        results["cpu_ratio"] = median["ratio"]
        results["kernel_ms_per_call"] = median["gateway_kernel_ms"]
        results["raw_kernel_ms_per_call"] = median["raw_kernel_ms"]
        results["framer"] = framer_share(targets[1:], open_files, seconds, args.procs)
        results["survival_ratio"] = sorted(
            c["survival_ratio"] for c in results["cpu_rounds"])[CPU_ROUNDS // 2]
        results["at_1000"] = responsive_at(gateway.address, 1000, seconds,
                                           1 if args.quick else 5)
        results["first_byte_at_200"] = latency(gateway.address, 200, seconds)
        results["raw_first_byte_at_200"] = latency(raw_address, 200, seconds)
        results["replacement_s"] = replacement_time(gateway)
        results["forked_replacement_s"] = replacement_time(unsurviving)
    finally:
        gateway.stop()
        unsurviving.stop()
        for pid in raw_pids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        raw_sock.close()
    results["proxy"] = proxy_cost(open_files, seconds, args.procs)
    for survival in ("off", "on"):
        results[f"sporadic_500_survival_{survival}"] = sporadic_crashes(
            open_files, 500, 1 if args.quick else 5, survival)
    for name, scenario, held in (("long", HELD_LONG, 1000), ("long", HELD_LONG, 10000),
                                 ("ivr", HELD_IVR, 10000)):
        # A fresh gateway each time: RSS never shrinks, so memory freed by an earlier run would
        # be reused and make the figure look better than it is.
        fresh = start_gateway(Path(tempfile.mkdtemp(prefix="esl-bench-")), open_files)
        try:
            rss_growth, cpu = held_calls(fresh, held, args.procs, scenario)
            results[f"rss_kib_per_{name}_call_{held}"] = rss_growth / 1024
            results[f"cpu_ms_per_{name}_call_{held}_held"] = 1000 * cpu
        finally:
            fresh.stop()
    stolen, ticks = cpu_stolen()
    results["stolen_percent"] = 100 * (stolen - stolen_before) / max(ticks - ticks_before, 1)
    print(report(results))
    print(json.dumps(results))
    return 0


def report(r: dict) -> str:
    def mark(ok):
        return "held" if ok else "NOT held"
    worst = max(c["ratio"] for c in r["cpu_rounds"])
    worst_p99 = max(run["first_byte_p99_ms"] for run in r["at_1000"])
    framer = r["framer"]
    framer_ms = framer["ms_per_call"]
    lines = [f"esl-gateway benchmark, {r['date']}, {r['cores']} cores (generator shares them); "
             f"{r['stolen_percent']:.1f} % of the run's CPU time stolen by the hypervisor",
             "",
             f"{'figure':<44}{'esl-gateway':>14}{'raw gevent':>14}   target",
             f"{'max ivr rate offered, 0 errors (calls/s)':<44}{r['max_rate']:>14.0f}"
             f"{r['raw_max_rate']:>14.0f}   1500: {mark(r['max_rate'] >= 1500)}"
             + (" (generator-bound)" if r["rate_steps"][-1]["generator_bound"] else ""),
             f"{'server CPU per ivr call (ms)':<44}{r['cpu_ms_per_call']:>14.3f}"
             f"{r['raw_cpu_ms_per_call']:>14.3f}   <= 1.3x raw, no round > 1.45x: ratio "
             f"{r['cpu_ratio']:.2f}, worst {worst:.2f} "
             f"{mark(r['cpu_ratio'] <= 1.3 and worst <= 1.45)}",
             f"{'  of which in the kernel (ms)':<44}{r['kernel_ms_per_call']:>14.3f}"
             f"{r['raw_kernel_ms_per_call']:>14.3f}   the rest is user space",
             f"{'  the framer, timed in the workers (ms)':<44}"
             f"{framer_ms:>14.3f}{'':>14}   {100 * framer['share']:.0f} % of the gateway's CPU; "
             f"a framer that cost nothing: ratio {r['cpu_ratio'] * (1 - framer['share']):.2f}",
             f"{'first byte p50 / p99 at 200 calls/s (ms)':<44}"
             f"{r['first_byte_at_200']['p50']:>6.2f} / {r['first_byte_at_200']['p99']:<5.2f}"
             f"{r['raw_first_byte_at_200']['p50']:>6.2f} / {r['raw_first_byte_at_200']['p99']:<5.2f}"
             f"   p99 < 5 ms: {mark(r['first_byte_at_200']['p99'] < 5)}",
             f"{'at 1000 calls/s: worst first byte p99 (ms)':<44}{worst_p99:>14.1f}{'':>14}"
             f"   <= 50 and 0 errors in every run: "
             f"{mark(worst_p99 <= 50 and not any(run['errors'] for run in r['at_1000']))}; "
             "runs " + ", ".join(f"{run['first_byte_p99_ms']:.1f} ms/{run['errors']} errors/"
                                 f"{run['offered']:.0f} offered" for run in r["at_1000"]),
             f"{'RSS per held long call, 1000 calls (KiB)':<44}"
             f"{r['rss_kib_per_long_call_1000']:>14.1f}",
             f"{'RSS per held long call, 10000 calls (KiB)':<44}"
             f"{r['rss_kib_per_long_call_10000']:>14.1f}{'':>14}   <= 20: "
             f"{mark(r['rss_kib_per_long_call_10000'] <= 20)}",
             f"{'RSS per held ivr call (25 s playback), 10000':<44}"
             f"{r['rss_kib_per_ivr_call_10000']:>14.1f}{'':>14}   <= 30: "
             f"{mark(r['rss_kib_per_ivr_call_10000'] <= 30)}",
             f"{'server CPU per ivr call, 10000 held (ms)':<44}"
             f"{r['cpu_ms_per_ivr_call_10000_held']:>14.3f}{'':>14}   x"
             f"{r['cpu_ms_per_ivr_call_10000_held'] / r['cpu_ms_per_call']:.2f} the short "
             "call's: a cost per open call would show here",
             f"{'SIGKILL to replacement accepting (ms)':<44}{r['replacement_s'] * 1000:>14.1f}"
             f"{'':>14}   <= 100: {mark(r['replacement_s'] <= 0.1)}",
             f"{'  the same without a spare (fork server)':<44}"
             f"{r['forked_replacement_s'] * 1000:>14.1f}{'':>14}   <= 100: "
             f"{mark(r['forked_replacement_s'] <= 0.1)}",
             f"{'server CPU per call, call survival off (ms)':<44}"
             f"{r['no_survival_cpu_ms_per_call']:>14.3f}{'':>14}   survival costs "
             f"x{r['survival_ratio']:.3f}"]
    proxy = r["proxy"]
    lines.append(f"{'proxy: CPU per call added (ms)':<44}{proxy['added_ms']:>14.3f}"
                 f"{'':>14}   <= 0.3: {mark(proxy['added_ms'] <= 0.3)} (direct "
                 f"{proxy['direct_ms']:.3f} ms, through the proxy {proxy['through_ms']:.3f} ms: "
                 f"ratio {proxy['ratio']:.2f}; of the added, in the kernel "
                 f"{proxy['kernel_added_ms']:.3f} ms; rounds " + ", ".join(
                     f"{c['added_ms']:.3f}" for c in proxy["rounds"]) + ")")
    for survival in ("off", "on"):
        runs = r[f"sporadic_500_survival_{survival}"]
        p99s = [run["first_byte_p99_ms"] for run in runs]
        lines.append(f"{f'1% crash 500/s, survival {survival}: p99 (ms)':<44}{max(p99s):>14.1f}"
                     f"{'':>14}   <= 50 in every run: {mark(max(p99s) <= 50)}; runs "
                     + ", ".join(f"{p:.1f}" for p in p99s) + "; completed " + ", ".join(
                         f"{run['completed']}/{run['calls']}" for run in runs))
    budget = 1000 * r["cores"] / 1500
    lines.append(f"CPU per call at 1500 calls/s on {r['cores']} cores: at most {budget:.2f} ms "
                 f"for generator and server together; the generator alone takes "
                 f"{r['generator_cpu_ms_per_call']:.2f} ms, raw gevent "
                 f"{r['raw_cpu_ms_per_call']:.2f} ms")
    lines.append("cpu_rounds (gateway/raw ms, gateway/no survival): " + ", ".join(
        f"{c['gateway_ms']:.3f}/{c['raw_ms']:.3f} = {c['ratio']:.2f}, "
        f"x{c['survival_ratio']:.3f}" for c in r["cpu_rounds"]))
    for name in ("rate_steps", "raw_rate_steps"):
        lines.append(f"{name}: " + ", ".join(
            f"{s['rate']}{'' if s['clean'] else ' FAILED'}"
            f"{' (generator-bound)' if s['generator_bound'] else ''}" for s in r[name]))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""``esl-gateway loadtest``: offer FreeSWITCH-like calls to any outbound ESL server and count them.

Scenarios: ``ivr`` (answer, prompt, hangup), ``hangup-race`` (the caller hangs up 0-N ms after
connecting, as a dialplan with ``socket`` then ``hangup`` does), ``long`` (calls held for a while
with a DTMF event every second). Open loop (``--rate``), closed loop (``--concurrency``) or both;
``--procs`` spreads the generator over several processes so it is not the bottleneck. Every call
ends with one outcome (completed, early_close, refused, reset, timeout, protocol_error); the exit
status is non-zero when any call did not complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import selectors
import sys
import time

from gateway import failover
from gateway.protocol import SOCKET_MODES

# gateway.simulator (gevent) is imported where it is used: the `esl-gateway` command line that
# builds this parser also starts the master, which must never import gevent.

SCENARIOS = ("ivr", "hangup-race", "long")
PROGRESS_INTERVAL = 0.5
PERCENTILES = (0.5, 0.9, 0.99, 1.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", metavar="HOST:PORT[|HOST:PORT...]",
                        type=failover.parse_targets,
                        help="the outbound ESL server, or several tried in order with "
                             "FreeSWITCH's failover (the next one only on a refused or "
                             "unreachable connect)")
    parser.add_argument("--scenario", choices=SCENARIOS, default="ivr")
    parser.add_argument("--rate", type=float, default=None, metavar="CALLS_PER_S",
                        help="open loop: new calls per second (default: as fast as "
                             "--concurrency allows)")
    parser.add_argument("--concurrency", type=int, default=None, metavar="N",
                        help="closed loop: at most N calls at once")
    parser.add_argument("--calls", type=int, default=None, metavar="N", help="calls to offer")
    parser.add_argument("--duration", type=float, default=None, metavar="SECONDS",
                        help="offer calls for this long (with --rate)")
    parser.add_argument("--procs", type=int, default=1, metavar="N",
                        help="generator processes (the load is split between them)")
    parser.add_argument("--mode", choices=SOCKET_MODES, default="async full",
                        help="the dialplan's socket keywords this FreeSWITCH uses")
    parser.add_argument("--playback-ms", type=float, default=0.0, metavar="MS",
                        help="how long each playback takes (ivr, hangup-race)")
    parser.add_argument("--hold", type=float, default=10.0, metavar="SECONDS",
                        help="how long a `long` call is held")
    parser.add_argument("--hangup-within", type=float, default=2.0, metavar="MS",
                        help="hangup-race: the caller hangs up 0..MS after connecting")
    parser.add_argument("--connect-wait", type=float, default=25.0, metavar="SECONDS",
                        help="how long to wait for `connect`, like FreeSWITCH (25 s)")
    parser.add_argument("--json", action="store_true", help="one JSON object, no table")


def call_options(args: argparse.Namespace):
    from gateway.simulator import CallOptions
    socket_mode, control = SOCKET_MODES[args.mode]
    options = CallOptions(socket_mode=socket_mode, control=control,
                          playback_ms=args.playback_ms, connect_wait=args.connect_wait)
    if args.scenario == "hangup-race":
        options.scenario, options.hangup_after_ms = "hangup-race", (0.0, args.hangup_within)
    elif args.scenario == "long":
        options.playback_ms, options.event_interval = args.hold * 1000, 1.0
        options.call_deadline = args.hold + 60
    return options


def call_count(args: argparse.Namespace) -> int:
    if args.calls is not None:
        return args.calls
    if args.duration is not None and args.rate:
        return int(args.duration * args.rate)
    return 100


def run(args: argparse.Namespace, progress=None):
    """Offer the calls the command line asks for; ``progress(counts, elapsed)`` now and then."""
    return offer(args.address, call_count(args), args.rate, args.concurrency,
                 call_options(args), args.procs, progress)


def offer(address, calls: int, rate: float | None = None, concurrency: int | None = None,
          options=None, procs: int = 1, progress=None):
    """Offer ``calls`` simulated calls from ``procs`` processes (a LoadResult with every
    call's result, as run_load gives): one process of Python cannot offer a few hundred
    faithful calls a second on its own."""
    from gateway.simulator import CallOptions
    options = options or CallOptions()
    shares = [calls // procs + (1 if i < calls % procs else 0) for i in range(procs)]
    rate = rate / procs if rate else None
    concurrency = max(1, concurrency // procs) if concurrency else None
    if procs == 1:
        return _run_here(address, shares[0], rate, concurrency, options, 0, progress)
    return _run_forked(address, shares, rate, concurrency, options, progress)


def _run_here(address, calls, rate, concurrency, options, seed, progress):
    from gateway.simulator import OUTCOMES, run_load
    counts = dict.fromkeys(OUTCOMES, 0)
    started = time.monotonic()
    shown = [started]

    def on_result(result) -> None:
        counts[result.outcome] += 1
        now = time.monotonic()
        if progress is not None and now - shown[0] >= PROGRESS_INTERVAL:
            shown[0] = now
            progress(counts, now - started)

    return run_load(address, calls, rate, concurrency, options, seed, on_result)


def _run_forked(address, shares, rate, concurrency, options, progress):
    """One child per share; each streams JSON lines (progress, then its results) on a pipe."""
    from gateway.simulator import OUTCOMES, CallResult, LoadResult
    started = time.monotonic()
    selector = selectors.DefaultSelector()
    children = {}
    for index, calls in enumerate(shares):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            _child(write_end, address, calls, rate, concurrency, options, index)
        os.close(write_end)
        children[pid] = {"buffer": b"", "counts": dict.fromkeys(OUTCOMES, 0), "results": None}
        selector.register(read_end, selectors.EVENT_READ, pid)
    results = []
    open_pipes = len(children)
    while open_pipes:
        for key, _ in selector.select(PROGRESS_INTERVAL):
            child = children[key.data]
            data = os.read(key.fd, 1 << 20)
            if not data:
                selector.unregister(key.fd)
                os.close(key.fd)
                open_pipes -= 1
                continue
            child["buffer"] += data
            *lines, child["buffer"] = child["buffer"].split(b"\n")
            for line in lines:
                message = json.loads(line)
                if "results" in message:
                    results += [CallResult(**item) for item in message["results"]]
                else:
                    child["counts"] = message["counts"]
        if progress is not None:
            merged = dict.fromkeys(OUTCOMES, 0)
            for child in children.values():
                for outcome, count in child["counts"].items():
                    merged[outcome] += count
            progress(merged, time.monotonic() - started)
    for pid in children:
        os.waitpid(pid, 0)
    return LoadResult(results, time.monotonic() - started)


def _child(pipe: int, address, calls, rate, concurrency, options, index) -> None:
    code = 1
    try:
        import gevent
        gevent.reinit()   # a parent that ran an event loop (a test) left us its copy

        def report(counts, _elapsed):
            os.write(pipe, json.dumps({"counts": counts}).encode() + b"\n")

        result = _run_here(address, calls, rate, concurrency, options, index, report)
        report(result.counts(), result.elapsed)
        payload = {"results": [dataclasses.asdict(r) for r in result.results]}
        data = json.dumps(payload).encode() + b"\n"
        while data:
            data = data[os.write(pipe, data):]
        code = 0
    finally:
        os._exit(code)


def summary(result, args: argparse.Namespace) -> dict:
    view = {"scenario": args.scenario, "mode": args.mode, "calls": len(result.results),
            "elapsed_s": round(result.elapsed, 3),
            "offered_rate": round(len(result.results) / result.elapsed, 1) if result.elapsed
            else None,
            "outcomes": result.counts()}
    for name, attribute in (("first_byte_ms", "first_byte_ms"), ("call_ms", "duration_ms")):
        view[name] = {("max" if q == 1.0 else f"p{int(q * 100)}"):
                      _round(result.percentile(attribute, q)) for q in PERCENTILES}
    view["hosts"] = {host: vars(figures) for host, figures in
                     failover.tally(args.address, result.results).items()}
    failures = result.failures()
    view["failure_examples"] = sorted({f"{r.outcome}: {r.detail}" for r in failures})[:5]
    return view


def _round(value):
    return None if value is None else round(value, 2)


def table(view: dict) -> str:
    lines = [f"{view['calls']} {view['scenario']} calls ({view['mode']}) in "
             f"{view['elapsed_s']:.1f} s, {view['offered_rate']} calls/s offered", ""]
    lines += [f"  {outcome:<15} {count:>8}" for outcome, count in view["outcomes"].items()]
    lines += ["", f"  {'latency':<12}" + "".join(f"{p:>10}" for p in ("p50", "p90", "p99", "max"))]
    for name, label in (("first_byte_ms", "first byte"), ("call_ms", "whole call")):
        values = view[name].values()
        lines.append(f"  {label:<12}" + "".join(
            f"{'-' if v is None else f'{v:.1f} ms':>10}" for v in values))
    if len(view["hosts"]) > 1:
        lines += ["", f"  {'host':<24}{'calls':>8}{'refused':>9}{'stalled':>9}"]
        lines += [f"  {host:<24}{f['calls']:>8}{f['refused']:>9}{f['stalled']:>9}"
                  for host, f in view["hosts"].items()]
    if view["failure_examples"]:
        lines += ["", "  failures, e.g.:"] + [f"    {text}" for text in view["failure_examples"]]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    def progress(counts, elapsed):
        done = sum(counts.values())
        failed = done - counts["completed"]
        sys.stderr.write(f"\r  {elapsed:6.1f}s  {done} calls done, {failed} failed   ")
        sys.stderr.flush()

    result = run(args, None if args.json else progress)
    if not args.json:
        sys.stderr.write("\n")
    view = summary(result, args)
    print(json.dumps(view) if args.json else table(view))
    return 0 if view["outcomes"]["completed"] == view["calls"] else 1

"""Python RPyC's own client in a timed loop, for the `py.*` rows of examples/bench.rs.

    bench_client.py --port P [--host H] [--size N] [--style callattr|bound|idiom]
                    [--calls N | --batches]

Connects to an RPyC 6 server offering `echo(*args) -> args` (demo_server.py, or the Rust
`rpyc::python::serve` server of the bench) and calls `echo(payload)` with an N-byte `bytes`
payload (16 by default), one call after the other, checking each reply.

* `--calls N` (standalone): warms up for 0.3 s, times N calls with `time.perf_counter` and
  prints `per_call_us <microseconds>`, then one line per style for comparison.
* `--batches` (what the bench uses): prints `READY`, then for each line `N` read on stdin runs
  N calls and prints `<seconds>` (perf_counter time of the N calls); an empty line or end of
  input ends it. The bench times the batches itself and alternates them with its own.

Styles (each is one round trip per call, except `idiom`):
* `callattr` (the default): one CALLATTR request per call,
  `netref.syncreq(conn.root, HANDLE_CALLATTR, "echo", (payload,), ())`: the very request the
  Rust client's `call_method("echo", ..)` sends. (Python's proxies send CALLATTR only for
  dunder methods: `conn.root.echo` is always a GETATTR.)
* `bound`: `echo = conn.root.echo` once (GETATTR), then `echo(payload)`: one CALL request per
  call on the bound-method proxy.
* `idiom`: `conn.root.echo(payload)` written out each time: a GETATTR and a CALL (two round
  trips) per call, and a DEL of the bound method.
"""

import argparse
import sys
import time

import rpyc
from rpyc.core import consts, netref


def caller(conn, style):
    root = conn.root
    if style == "callattr":
        return lambda p: netref.syncreq(root, consts.HANDLE_CALLATTR, "echo", (p,), ())
    if style == "bound":
        return root.echo
    if style == "idiom":
        return lambda p: root.echo(p)
    raise SystemExit(f"unknown style {style!r}")


def run(call, payload, n):
    """n calls; seconds they took."""
    want = (payload,)
    start = time.perf_counter()
    for _ in range(n):
        got = call(payload)
        if got != want:
            raise SystemExit(f"echo returned {got!r}, expected {want!r}")
    return time.perf_counter() - start


def warm_up(call, payload, seconds=0.3):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        run(call, payload, 10)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--size", type=int, default=16, help="payload bytes (default 16)")
    parser.add_argument("--style", default="callattr", choices=["callattr", "bound", "idiom"])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--calls", type=int, help="time this many calls and print the result")
    mode.add_argument("--batches", action="store_true", help="run batches asked for on stdin")
    args = parser.parse_args()

    conn = rpyc.connect(args.host, args.port, config={"sync_request_timeout": 30})
    payload = bytes((i * 7 + 1) & 0xFF for i in range(args.size))
    call = caller(conn, args.style)

    if args.batches:
        warm_up(call, payload, 0.1)
        print("READY", flush=True)
        for line in sys.stdin:
            line = line.strip()
            if not line:
                break
            print(f"{run(call, payload, int(line)):.9f}", flush=True)
    else:
        for style in [args.style] + [s for s in ("callattr", "bound", "idiom") if s != args.style]:
            call = caller(conn, style)
            warm_up(call, payload)
            per_call = run(call, payload, args.calls) / args.calls
            if style == args.style:
                print(f"per_call_us {per_call * 1e6:.2f}", flush=True)
            print(f"  {style:<9} {per_call * 1e6:8.2f} us/call", flush=True)
    conn.close()


if __name__ == "__main__":
    main()

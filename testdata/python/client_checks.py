"""A real RPyC 6 client that checks a Rust server, for the Python-client interop tests.

    client_checks.py --port P [--host H]
                     [--tls] [--tls-ca CA] [--tls-key K --tls-cert C] [--tls-verify-hostname]
                     [--ssh-port SP --ssh-user U --ssh-key KEYFILE --ssh-known-hosts F]
                     [--unix PATH]
                     CHECK...

Connects once (TCP; TLS with any --tls* option, rpyc's defaults with just --tls; through
`ssh -L` made by plumbum with --ssh-port; or a Unix socket with --unix), then runs the CHECKs in
the order given on that one connection, printing `OK <name>` after each check that passed. On
the first failure it prints `FAIL <name>` on stdout and the traceback on stderr, and exits with
status 1.

CHECK is a check's name (see CHECKS below), `all` (every check that takes no argument and is not
slow, in the order of CHECKS, ending with `refcounts` and `close`), or a check with its argument:
`tls_cn EXPECTED` (EXPECTED `None`: no client certificate) or `many N`. `slow` (a second
connection is served while the first sleeps) and `timeout` (a call slower than the client's
timeout) take seconds and are not in `all`. `close` must come last.

The Rust server's root service is expected to offer:
    echo(*args) -> args as a tuple        add(a, b) -> a + b          version = "1.0" (attribute)
    fail(x) raises ValueError(f"bad value: {x}")
    apply(func, x) -> func(x) + 1         make_counter(start) -> object with incr(by=1), value()
    total(seq) -> sum of a list/tuple     keys_of(d) -> sorted tuple of a dict's keys
    object_count() -> objects the server holds for this connection (1 = the root only)
    peer_cn() -> the client certificate's CN, or None
    sleep(seconds) -> seconds, after sleeping
reference_server.py is that service in Python. Two things a server meets here: the client's
default policy lets it iterate a list or dict (`__iter__`) but refuses `d.keys()`; and
`refcounts` calls object_count with CALLATTR, so that no bound-method object is counted.
"""

import argparse
import gc
import math
import ssl
import sys
import threading
import time
import traceback

import rpyc
from rpyc.core import consts, netref
from rpyc.utils.factory import unix_connect

# Every synchronous request gives up after this long (rpyc's default is 30 s).
SYNC_TIMEOUT = 10


def expect(cond, what, *detail):
    """Fails the check with a message naming `what` (and showing `detail`) unless `cond`."""
    if not cond:
        raise AssertionError(what + "".join(f"\n  {d!r}" for d in detail))


def expect_eq(got, want, what):
    if got != want or type(got) is not type(want):
        raise AssertionError(f"{what}:\n  got  {got!r} ({type(got).__name__})\n"
                             f"  want {want!r} ({type(want).__name__})")


def callattr(proxy, name, *args):
    """`proxy.name(*args)` in one CALLATTR request, as netrefs do for dunder methods.

    Unlike `proxy.name(*args)` (GETATTR, then CALL on a bound-method object), this leaves no
    bound-method object in the server's table while the call runs -- what `refcounts` needs.
    """
    return netref.syncreq(proxy, consts.HANDLE_CALLATTR, name, args, ())


# ---------------------------------------------------------------------------------------------
# The checks. Each takes the connection (and its argument, if it has one) and raises on failure.
# They keep no proxies beyond their return, so that `refcounts` can see everything released.

ECHO_VALUES = [
    None, True, False, Ellipsis, NotImplemented,
    0, 1, -1, -48, 159, -49, 160, 1000, 2**31, -(2**31), 2**62, 2**63 - 1, -(2**63),
    2**63, 2**64, -(2**63) - 1, 10**30, -(10**30),
    0.0, 1.5, -2.25, 1e300, 5e-324, float("inf"), float("-inf"),
    complex(1, -2), complex(0, 0),
    "", "x", "hello", "\u00e9t\u00e9", "\u65e5\u672c\u8a9e", "\U0001f600", "a" * 300,
    b"", b"y", b"abcd", b"abcde", b"\x00\xff" * 150, bytes(range(256)),
    (), (1,), (1, 2), (1, 2, 3), (1, 2, 3, 4), tuple(range(5)), tuple(range(300)),
    ((1, "a"), (b"b", None), ((), ((2.5,),))),
    frozenset(), frozenset({1}), frozenset({1, "a", b"b", (2, 3)}),
    slice(1, 2, 3), slice(None, 5, None), slice("a", b"b", (1,)),
]


def check_echo(conn):
    """Every brine type round-trips through echo(*args), including compressed frames."""
    echo = conn.root.echo
    for value in ECHO_VALUES:
        expect_eq(echo(value), (value,), f"echo({value!r:.60})")
    expect_eq(echo(*ECHO_VALUES), tuple(ECHO_VALUES), "echo(*all values)")
    # -0.0 == 0.0: check the sign went through.
    (zero,) = echo(-0.0)
    expect(math.copysign(1.0, zero) == -1.0, "echo(-0.0) kept the sign", zero)
    (nan,) = echo(float("nan"))
    expect(isinstance(nan, float) and math.isnan(nan), "echo(nan) is a NaN", nan)
    # Payloads over 3000 bytes travel zlib-compressed, both ways.
    big = b"\x00\x01rpyc" * 1000 + bytes(range(256)) * 4
    expect_eq(echo(big), (big,), "echo(6 KB of bytes): a compressed frame")
    expect_eq(echo(b"x" * 5000), (b"x" * 5000,), "echo(5000 bytes)")
    text = "\u00e9\u65e5" * 2000
    expect_eq(echo(text), (text,), "echo(10 KB of UTF-8)")
    expect_eq(echo(), (), "echo()")


def check_exposed_prefix(conn):
    """`exposed_add` and `add` name the same method."""
    expect_eq(conn.root.exposed_add(1, 2), 3, "root.exposed_add(1, 2)")
    expect_eq(conn.root.add(1, 2), 3, "root.add(1, 2)")


def check_attribute(conn):
    """A plain attribute comes by value."""
    expect_eq(conn.root.version, "1.0", "root.version")
    expect_eq(conn.root.exposed_version, "1.0", "root.exposed_version")


def check_exception(conn):
    """A server exception is a Python ValueError carrying the server's traceback."""
    try:
        conn.root.fail(42)
    except ValueError as e:
        text = str(e)
        expect("bad value: 42" in text, "the message is in str(e)", text)
        expect("Remote Traceback" in text, "the remote traceback is in str(e)", text)
        expect("WARNING: Remote is on RPyC" not in text,
               "no version warning (the server's _remote_version is 6.x or denied)", text)
        expect_eq(e.args[0], "bad value: 42", "e.args[0]")
    else:
        raise AssertionError("root.fail(42) did not raise ValueError")
    # The connection survives a failed call.
    expect_eq(conn.root.add(1, 1), 2, "root.add(1, 1) after the exception")


def check_callback(conn):
    """The server calls back into this client while serving our call."""
    expect_eq(conn.root.apply(lambda v: v * 2, 20), 41, "root.apply(lambda v: v * 2, 20)")

    class Doubler:
        """A callable of a class of ours: travels as `__main__.Doubler`, not `builtins.function`."""

        def __call__(self, v):
            return v * 2

    expect_eq(conn.root.apply(Doubler(), 5), 11, "root.apply(Doubler(), 5)")


def check_objects(conn):
    """A server object by reference: methods, keyword arguments, repr, ==, hash, dir."""
    c = conn.root.make_counter(10)
    expect_eq(c.incr(5), 15, "counter.incr(5)")
    expect_eq(c.incr(by=2), 17, "counter.incr(by=2)")
    expect_eq(c.incr(), 18, "counter.incr()")
    expect_eq(c.value(), 18, "counter.value()")
    expect(isinstance(repr(c), str), "repr(counter) is a str", repr(c))
    expect(isinstance(str(c), str), "str(counter) is a str", str(c))
    expect(c == c, "counter == counter")
    expect(not (c != c), "not counter != counter")
    expect(isinstance(hash(c), int), "hash(counter) is an int")
    expect_eq(hash(c), hash(c), "hash(counter) is stable")
    names = dir(c)
    # A Python server lists the names as defined (exposed_incr); either form is fine.
    for method in ("incr", "value"):
        expect(method in names or "exposed_" + method in names,
               f"dir(counter) lists {method} (or exposed_{method})", names)
    other = conn.root.make_counter(0)
    expect_eq(other.value(), 0, "a second counter is independent: value()")
    expect_eq(c.value(), 18, "the first counter is unchanged: value()")


def check_collections(conn):
    """Python lists, tuples and dicts as arguments: the server reads them."""
    expect_eq(conn.root.total([1, 2, 3]), 6, "root.total([1, 2, 3]) (a list, by reference)")
    expect_eq(conn.root.total((1, 2, 3)), 6, "root.total((1, 2, 3)) (a tuple, by value)")
    expect_eq(conn.root.total([]), 0, "root.total([])")
    expect_eq(conn.root.total(list(range(1000))), 499500, "root.total(list(range(1000)))")
    expect_eq(conn.root.keys_of({"b": 1, "a": 2}), ("a", "b"), "root.keys_of({'b': 1, 'a': 2})")


def check_refcounts(conn):
    """Once this client dropped its proxies, the server holds only the root for it."""
    # rpyc keeps the traceback of the last exception one of *our* handlers raised (e.g. the
    # StopIteration ending a server's iteration over our list) in Connection._last_traceback;
    # its frames keep proxies alive. That is rpyc's doing, not the server's: drop it.
    conn._last_traceback = None
    gc.collect()
    # Our DEL requests are asynchronous: the server may count before it has handled them all.
    # object_count goes by CALLATTR so that no bound-method object is counted.
    deadline = time.monotonic() + 5
    while True:
        count = callattr(conn.root, "object_count")
        if count == 1 or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    expect_eq(count, 1, "root.object_count() once our proxies are gone (1 = the root only)")


def check_ping(conn):
    conn.ping(timeout=SYNC_TIMEOUT)


def check_close(conn):
    conn.close()
    expect(conn.closed, "conn.closed after conn.close()")


def check_tls_cn(conn, expected):
    """The server sees our certificate's common name (`None`: no certificate)."""
    want = None if expected == "None" else expected
    got = conn.root.peer_cn()
    expect(got == want, f"root.peer_cn() == {want!r}", got)


def check_many(conn, n):
    """N calls of add, with a callback every 10 calls (a soak)."""
    n = int(n)
    started = time.monotonic()
    for i in range(n):
        expect_eq(conn.root.add(i, 1), i + 1, f"call {i}: root.add({i}, 1)")
        if i % 10 == 9:
            expect_eq(conn.root.apply(lambda v: v + i, 1), i + 2, f"call {i}: root.apply(...)")
    elapsed = time.monotonic() - started
    print(f"many: {n} calls in {elapsed:.2f} s", file=sys.stderr, flush=True)


def check_slow(conn):
    """While one connection waits in sleep(1), the server still serves another promptly."""
    result = {}

    def sleeper():
        try:
            result["value"] = conn.root.sleep(1.0)
        except BaseException as e:  # reported below
            result["error"] = e

    thread = threading.Thread(target=sleeper)
    thread.start()
    time.sleep(0.2)  # let the sleep call reach the server
    other = connect(ARGS)
    try:
        started = time.monotonic()
        expect_eq(other.root.add(2, 2), 4, "root.add(2, 2) on a second connection")
        took = time.monotonic() - started
        expect(took < 0.7, "the second connection's call did not wait for the sleep", took)
    finally:
        other.close()
    thread.join(SYNC_TIMEOUT)
    expect(not thread.is_alive(), "root.sleep(1.0) returned")
    if "error" in result:
        raise result["error"]
    expect_eq(result["value"], 1.0, "root.sleep(1.0)")


def check_timeout(conn):
    """A server method slower than our sync_request_timeout: TimeoutError, and the connection
    survives (the late reply is dropped)."""
    conn._config["sync_request_timeout"] = 1
    try:
        try:
            conn.root.sleep(2.0)
        except TimeoutError:
            pass
        else:
            raise AssertionError("root.sleep(2.0) with a 1 s timeout did not time out")
    finally:
        conn._config["sync_request_timeout"] = SYNC_TIMEOUT
    time.sleep(1.5)  # the late reply arrives meanwhile
    expect_eq(conn.root.add(1, 2), 3, "root.add(1, 2) after the timeout")


# name -> (function, takes an argument, part of `all`)
CHECKS = {
    "echo": (check_echo, False, True),
    "exposed_prefix": (check_exposed_prefix, False, True),
    "attribute": (check_attribute, False, True),
    "exception": (check_exception, False, True),
    "callback": (check_callback, False, True),
    "objects": (check_objects, False, True),
    "collections": (check_collections, False, True),
    "ping": (check_ping, False, True),
    "refcounts": (check_refcounts, False, True),
    "close": (check_close, False, True),
    "tls_cn": (check_tls_cn, True, False),
    "many": (check_many, True, False),
    "slow": (check_slow, False, False),
    "timeout": (check_timeout, False, False),
}


def plan(words):
    """The (name, argument or None) pairs the command line asks for, in order."""
    steps = []
    words = list(words)
    while words:
        name = words.pop(0)
        if name == "all":
            steps.extend((n, None) for n, (_, _, in_all) in CHECKS.items() if in_all)
            continue
        if name not in CHECKS:
            sys.exit(f"unknown check {name!r}; known: all, {', '.join(CHECKS)}")
        _, takes_arg, _ = CHECKS[name]
        if takes_arg:
            if not words:
                sys.exit(f"check {name!r} needs an argument")
            steps.append((name, words.pop(0)))
        else:
            steps.append((name, None))
    names = [name for name, _ in steps]
    if "close" in names[:-1]:
        sys.exit("`close` (also the end of `all`) must be the last check")
    return steps


# ---------------------------------------------------------------------------------------------
# Connecting

def connect(args):
    config = {"sync_request_timeout": SYNC_TIMEOUT}
    tls = args.tls or args.tls_ca or args.tls_key or args.tls_cert or args.tls_verify_hostname
    if args.unix:
        return unix_connect(args.unix, config=config)
    if args.ssh_port:
        from plumbum import SshMachine

        opts = [
            "-F", "/dev/null",  # no ssh_config of the user's
            "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes",
            "-o", "IdentityAgent=none",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "ConnectTimeout=10",
        ]
        if args.ssh_known_hosts:
            opts += ["-o", f"UserKnownHostsFile={args.ssh_known_hosts}",
                     "-o", "GlobalKnownHostsFile=/dev/null"]
        machine = SshMachine(args.host, port=args.ssh_port, user=args.ssh_user,
                             keyfile=args.ssh_key, ssh_opts=opts, connect_timeout=10)
        conn = rpyc.ssh_connect(machine, args.port, config=config)
        MACHINES.append(machine)
        return conn
    if tls:
        kwargs = {}
        if args.tls_verify_hostname:
            # Only an explicit cert_reqs makes rpyc check the host name too.
            kwargs["cert_reqs"] = ssl.CERT_REQUIRED
        return rpyc.ssl_connect(args.host, args.port, keyfile=args.tls_key,
                                certfile=args.tls_cert, ca_certs=args.tls_ca, config=config,
                                **kwargs)
    return rpyc.connect(args.host, args.port, config=config)


MACHINES = []  # SshMachines to close at exit (each runs an ssh process)
ARGS = None


def main():
    global ARGS
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="checks: all, " + ", ".join(
            n + (" ARG" if takes_arg else "") for n, (_, takes_arg, _) in CHECKS.items()))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="the Rust server's port")
    parser.add_argument("--tls", action="store_true", help="TLS with rpyc's defaults")
    parser.add_argument("--tls-ca", help="verify the server's chain against this CA")
    parser.add_argument("--tls-key", help="client private key (PEM)")
    parser.add_argument("--tls-cert", help="client certificate (PEM)")
    parser.add_argument("--tls-verify-hostname", action="store_true",
                        help="also check the host name (cert_reqs=CERT_REQUIRED)")
    parser.add_argument("--ssh-port", type=int, help="connect through ssh -L to this sshd")
    parser.add_argument("--ssh-user")
    parser.add_argument("--ssh-key", help="private key file for ssh")
    parser.add_argument("--ssh-known-hosts", help="known_hosts file for ssh")
    parser.add_argument("--unix", metavar="PATH", help="connect to a Unix socket instead")
    parser.add_argument("checks", nargs="+", metavar="CHECK")
    ARGS = parser.parse_args()
    steps = plan(ARGS.checks)

    conn = None
    name = "connect"
    try:
        conn = connect(ARGS)
        for name, arg in steps:
            func, takes_arg, _ = CHECKS[name]
            if takes_arg:
                func(conn, arg)
            else:
                func(conn)
            print(f"OK {name}", flush=True)
    except BaseException:
        print(f"FAIL {name}", flush=True)
        traceback.print_exc()
        sys.stderr.flush()
        return 1
    finally:
        try:
            if conn is not None and not conn.closed:
                conn.close()
        finally:
            for machine in MACHINES:
                machine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A real RPyC 6 server for the Rust client tests.

Runs rpyc.ThreadedServer on 127.0.0.1 (a free port) serving DemoService, or the classic
SlaveService with --classic, and prints `PORT <n>` once it listens (`PORT 0` for --unix).
Then it prints `CONNECTED` and `DISCONNECTED` as clients come and go.

    demo_server.py [--classic] [--tls-key K --tls-cert C [--tls-ca CA]] [--unix PATH]
                   [--sync-timeout S]

With --tls-ca, clients must present a certificate signed by that CA. When the environment
variable RPYC_TEST_WATCH_STDIN=1 is set (the Rust test helpers set it), the server exits as
soon as its stdin reaches end of file, so it never outlives the test process that started it.
"""

import argparse
import os
import sys
import threading
import time

import rpyc
from rpyc.utils.authenticators import SSLAuthenticator
from rpyc.utils.server import ThreadedServer


def say(line):
    """One line on stdout, flushed at once: the Rust side reads it line by line."""
    print(line, flush=True)


class DemoError(Exception):
    """A custom exception class: travels as `__main__.DemoError`."""


class Counter:
    """An object returned by reference: method calls, a property, repr, ==, hash."""

    def __init__(self, start=0):
        self.value = start

    def exposed_incr(self, by=1):
        self.value += by
        return self.value

    @property
    def exposed_value(self):
        return self.value

    def __repr__(self):
        return f"Counter({self.value})"

    def __eq__(self, other):
        return isinstance(other, Counter) and other.value == self.value

    def __hash__(self):
        return hash(self.value)


class DemoService(rpyc.Service):
    """One instance per connection (ThreadedServer is given the class)."""

    exposed_version = "1.0"

    def __init__(self):
        super().__init__()
        self._conn = None
        self._same = Counter(100)

    def on_connect(self, conn):
        self._conn = conn
        say("CONNECTED")

    def on_disconnect(self, conn):
        say("DISCONNECTED")

    # Values

    def exposed_echo(self, *args):
        return args

    def exposed_add(self, a, b):
        return a + b

    def exposed_kwargs(self, a, b=2, *, c=3):
        return (a, b, c)

    def exposed_blob(self, n):
        return b"x" * n

    def exposed_length(self, b):
        return len(b)

    def exposed_sleep(self, seconds):
        time.sleep(seconds)
        return seconds

    def exposed_pid(self):
        return os.getpid()

    # Exceptions

    def exposed_fail(self, x):
        raise ValueError(f"bad value: {x!r}")

    def exposed_fail_custom(self):
        raise DemoError("custom", 7)

    # Callbacks and objects of the client

    def exposed_apply(self, func, x):
        return func(x) + 1

    def exposed_apply_many(self, func, n):
        return sum(func(i) for i in range(n))

    def exposed_call_repr(self, obj):
        return repr(obj)

    def exposed_call_str(self, obj):
        return str(obj)

    def exposed_remote_total(self, lst):
        return sum(x for x in lst)

    # Objects of this side

    def exposed_make_counter(self, start=0):
        return Counter(start)

    def exposed_same(self):
        return self._same

    def exposed_local_count(self):
        """How many objects this side holds for the client: 1 (the root) at rest when called
        with CALLATTR; 2 when called as Python calls methods, GETATTR then CALL, since the bound
        method is held while it runs."""
        # Connection._local_objects is a rpyc.lib.colls.RefCountingColl: no __len__, the
        # entries are in its `_dict` (id_pack -> [obj, extra_count]).
        return len(self._conn._local_objects._dict)

    # Collections (lists, dicts and sets travel by reference)

    def exposed_as_list(self, *xs):
        return list(xs)

    def exposed_as_dict(self, **kw):
        return dict(kw)

    def exposed_as_set(self, *xs):
        return set(xs)

    def exposed_range_list(self, n):
        return list(range(n))

    def exposed_floats(self, n):
        return [i * 0.5 for i in range(n)]


UNIX_SOCKETS = []  # removed when exit_when_parent_goes() ends the process


def exit_when_parent_goes():
    """Exits the process when stdin reaches EOF (the test process that started it is gone)."""

    def watch():
        try:
            while sys.stdin.buffer.read(4096):
                pass
        finally:
            for path in UNIX_SOCKETS:
                try:
                    os.unlink(path)
                except OSError:
                    pass
            os._exit(0)

    threading.Thread(target=watch, name="stdin-watch", daemon=True).start()


def main(service_class=None, description=None):
    """Parses the command line and serves until killed. `service_class` replaces DemoService
    (for reference_server.py, which then has no --classic)."""
    parser = argparse.ArgumentParser(description=description or __doc__.splitlines()[0])
    if service_class is None:
        parser.add_argument("--classic", action="store_true", help="serve rpyc.SlaveService")
    parser.add_argument("--tls-key", help="server private key (PEM)")
    parser.add_argument("--tls-cert", help="server certificate (PEM)")
    parser.add_argument("--tls-ca", help="CA for client certificates (then required)")
    parser.add_argument("--unix", metavar="PATH", help="listen on a Unix socket instead")
    parser.add_argument("--sync-timeout", type=float, help="sync_request_timeout (s)")
    args = parser.parse_args()

    if os.environ.get("RPYC_TEST_WATCH_STDIN") == "1":
        exit_when_parent_goes()

    if bool(args.tls_key) != bool(args.tls_cert):
        parser.error("--tls-key and --tls-cert go together")
    if args.tls_ca and not args.tls_key:
        parser.error("--tls-ca needs --tls-key and --tls-cert")

    if service_class is not None:
        service = service_class
    else:
        service = rpyc.SlaveService if args.classic else DemoService
    config = {}
    if args.sync_timeout is not None:
        config["sync_request_timeout"] = args.sync_timeout
    authenticator = None
    if args.tls_key:
        authenticator = SSLAuthenticator(args.tls_key, args.tls_cert, ca_certs=args.tls_ca)

    if args.unix:
        server = ThreadedServer(service, socket_path=args.unix, authenticator=authenticator,
                                protocol_config=config)
        UNIX_SOCKETS.append(args.unix)
        port = 0
    else:
        # With port=0, ThreadedServer binds in its constructor and keeps the bound port in
        # `server.port`.
        server = ThreadedServer(service, hostname="127.0.0.1", port=0,
                                authenticator=authenticator, protocol_config=config)
        port = server.port
    # The socket is only bound so far: start() calls listen(). Listen before saying PORT, or a
    # client could connect in between and be refused. (_listen() is what start() calls first;
    # it does nothing the second time.)
    server._listen()
    say(f"PORT {port}")
    server.start()


if __name__ == "__main__":
    main()

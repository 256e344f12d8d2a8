"""A Python implementation of the service client_checks.py expects from the Rust server.

client_checks.py passes against it (`all`, `tls_cn`, `many`, `slow`, `timeout`): run both to
tell a fault of the checks from a fault of the Rust server. Same command line and output as
demo_server.py (`PORT <n>`, then CONNECTED/DISCONNECTED), without --classic.
"""

import sys

sys.dont_write_bytecode = True  # importing demo_server must leave no __pycache__ here

import rpyc  # noqa: E402

import demo_server  # noqa: E402


class Counter:
    def __init__(self, start):
        self._value = start

    def exposed_incr(self, by=1):
        self._value += by
        return self._value

    def exposed_value(self):
        return self._value

    def __repr__(self):
        return f"Counter({self._value})"


class ReferenceService(rpyc.Service):
    exposed_version = "1.0"

    def on_connect(self, conn):
        self._conn = conn
        demo_server.say("CONNECTED")

    def on_disconnect(self, conn):
        demo_server.say("DISCONNECTED")

    def exposed_echo(self, *args):
        return args

    def exposed_add(self, a, b):
        return a + b

    def exposed_fail(self, x):
        raise ValueError(f"bad value: {x}")

    def exposed_apply(self, func, x):
        return func(x) + 1

    def exposed_make_counter(self, start):
        return Counter(start)

    def exposed_total(self, seq):
        return sum(seq)

    def exposed_keys_of(self, d):
        # Iterate: the client's default policy refuses d.keys() (not a "safe" attribute),
        # but allows __iter__.
        return tuple(sorted(d))

    def exposed_object_count(self):
        return len(self._conn._local_objects._dict)

    def exposed_peer_cn(self):
        cert = self._conn._config.get("credentials") or {}
        for rdn in cert.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    return value
        return None

    def exposed_sleep(self, seconds):
        import time

        time.sleep(seconds)
        return seconds


if __name__ == "__main__":
    demo_server.main(ReferenceService, description=__doc__.splitlines()[0])

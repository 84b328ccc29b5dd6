#!/usr/bin/python3
"""Holds sockets of every kind that is no leak, and on demand the two kinds that are.

    bystanders.py

At start it opens, and keeps to the end:
- TCP, IPv4 and IPv6: never connected (`never`, `never6`), bound only (`bound`), listening
  (`listening`), a connect() refused (`refused`, `refused6`), both ends of an ESTABLISHED
  loopback connection (`estab-client`, `estab-server`);
- unix: a stream socketpair (`unix-pair-a`, `unix-pair-b`), a datagram socket bound to an
  abstract name (`unix-dgram`), a listening stream socket on an abstract name
  (`unix-listening`), an unbound one (`unix-unbound`);
- UDP: bound (`udp-bound`), connected (`udp-connected`), IPv6 bound (`udp6-bound`);
- `acceptor`: a TCP listener for the test's own connections.
It prints `fd KIND N` for each, `listen ADDR` for the acceptor, then `ready`.

stdin, one command a line: `accept` accepts one connection on the acceptor and prints
`accepted FD LOCAL REMOTE`. The accepted sockets are never read nor closed: a peer that
half-closes leaves its socket in CLOSE_WAIT, a peer that resets it leaves it in CLOSE,
held by the fd.
"""

import socket
import sys


def say(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def fmt(addr):
    host, port = addr[0], addr[1]
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


def refused(family, host):
    """A socket whose blocking connect() to a port nobody listens on was refused."""
    probe = socket.socket(family, socket.SOCK_STREAM)
    probe.bind((host, 0))
    dead = probe.getsockname()
    probe.close()
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.connect(dead)
        say("error the refused socket connected")
    except ConnectionRefusedError:
        pass
    return s


def main():
    held = {}

    held["never"] = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    held["never6"] = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)

    held["bound"] = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    held["bound"].bind(("127.0.0.1", 0))

    held["listening"] = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    held["listening"].bind(("127.0.0.1", 0))
    held["listening"].listen(8)

    held["refused"] = refused(socket.AF_INET, "127.0.0.1")
    held["refused6"] = refused(socket.AF_INET6, "::1")

    held["estab-client"] = socket.create_connection(held["listening"].getsockname())
    held["estab-server"], _ = held["listening"].accept()

    held["unix-pair-a"], held["unix-pair-b"] = socket.socketpair(
        socket.AF_UNIX, socket.SOCK_STREAM
    )
    tag = "cwreap-bystanders-%d" % id(held)
    held["unix-dgram"] = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    held["unix-dgram"].bind("\0" + tag + "-dgram")
    held["unix-listening"] = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    held["unix-listening"].bind("\0" + tag + "-stream")
    held["unix-listening"].listen(8)
    held["unix-unbound"] = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    held["udp-bound"] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    held["udp-bound"].bind(("127.0.0.1", 0))
    held["udp-connected"] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    held["udp-connected"].connect(held["udp-bound"].getsockname())
    held["udp6-bound"] = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    held["udp6-bound"].bind(("::1", 0))

    acceptor = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    acceptor.bind(("127.0.0.1", 0))
    acceptor.listen(8)
    held["acceptor"] = acceptor

    for kind, s in held.items():
        say("fd %s %d" % (kind, s.fileno()))
    say("listen " + fmt(acceptor.getsockname()))
    say("ready")

    accepted = []
    for line in sys.stdin:
        if line.strip() != "accept":
            continue
        conn, peer = acceptor.accept()
        accepted.append(conn)
        say("accepted %d %s %s" % (conn.fileno(), fmt(conn.getsockname()), fmt(peer)))
    # Keep every object alive to the end: no finalizer may close one of the fds.
    _ = (held, accepted)


if __name__ == "__main__":
    main()

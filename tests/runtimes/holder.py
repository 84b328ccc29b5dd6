#!/usr/bin/python3
"""Holds one TCP socket of each kind `cwreap reap --close` must never close, and one it may.

    holder.py

stdout, one line each, flushed: `fd never N` (a socket that was never connected), `fd bound N`
(bound, not listening), `fd listening N` (listening, nothing accepted yet), `fd refused N`
(its blocking connect() was refused), `listen ADDR` (a second listener: connect there and
half-close, and the accepted socket goes to CLOSE_WAIT), `fd closewait N` once that
connection is accepted, then `ready`.

stdin: `use` makes the program use each of the four first sockets, which fails if any of
them was closed behind its back: the never-connected one connects to the listening one,
the bound one listens, the listening one accepts, the refused one answers
getsockopt(SO_TYPE). It answers `used ok`, or `used error WHAT`.
"""

import socket
import sys


def say(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def fmt(addr):
    return "%s:%d" % (addr[0], addr[1])


def main():
    never = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    say("fd never %d" % never.fileno())

    bound = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    bound.bind(("127.0.0.1", 0))
    say("fd bound %d" % bound.fileno())

    listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listening.bind(("127.0.0.1", 0))
    listening.listen(8)
    say("fd listening %d" % listening.fileno())

    # A port nobody listens on: bind one, note it, close it, connect to it.
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.bind(("127.0.0.1", 0))
    dead = probe.getsockname()
    probe.close()
    refused = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        refused.connect(dead)
        say("error the refused socket connected")
    except ConnectionRefusedError:
        pass
    say("fd refused %d" % refused.fileno())

    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    say("listen " + fmt(server.getsockname()))
    conn, _ = server.accept()
    say("fd closewait %d" % conn.fileno())
    say("ready")

    for line in sys.stdin:
        if line.strip() != "use":
            continue
        step = "connect"
        try:
            never.settimeout(5)
            never.connect(listening.getsockname())
            step = "listen"
            bound.listen(8)
            step = "accept"
            listening.settimeout(5)
            accepted, _ = listening.accept()
            accepted.close()
            step = "getsockopt"
            kind = refused.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
            if kind != socket.SOCK_STREAM:
                raise OSError("SO_TYPE is %d" % kind)
            say("used ok")
        except OSError as e:
            say("used error %s: %s" % (step, e))
    # Keep every object alive to the end: no finalizer may close one of the fds.
    _ = (never, bound, listening, refused, server, conn)


if __name__ == "__main__":
    main()

#!/usr/bin/python3
"""One process holding CLOSE_WAIT sockets at both ends of connections, for the selector tests.

    mixed.py --tag TAG --backend IP [--pid-file PATH]

It listens on 127.0.0.1 (the app port), on IP (a backend it is a client of: Redis, a
database) and on [::] (dual stack). Then it makes these connections and holds its own end
of each in CLOSE_WAIT, closing the other end itself right away (so no process holds it):

    server  2  accepted on the app port, from 127.0.0.3             (direction in)
    client  3  opened from 127.0.0.1 to IP:backend port              (direction out)
    mapped  1  accepted on the dual-stack port from IPv4 127.0.0.4   (in, peer ::ffff:127.0.0.4)
    v6      1  opened from ::1 to [::1]:dual-stack port              (out)

stdout: `app PORT`, `backend PORT`, `dual PORT`, then `sock KIND FD LOCAL REMOTE` for each
socket held (addresses as ss prints them), then `ready`. It then waits for stdin to close.
TAG only marks the command line, for --cmdline.
"""

import argparse
import os
import socket
import sys


def say(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def fmt(addr):
    host, port = addr[0], addr[1]
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


def listener(family, host):
    s = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind((host, 0))
    s.listen(64)
    return s


def connect(family, source, dest):
    c = socket.socket(family, socket.SOCK_STREAM)
    c.bind((source, 0))
    c.connect(dest)
    return c


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tag", required=True)
    p.add_argument("--backend", required=True)
    p.add_argument("--pid-file")
    args = p.parse_args()

    app = listener(socket.AF_INET, "127.0.0.1")
    backend = listener(socket.AF_INET, args.backend)
    dual = listener(socket.AF_INET6, "::")
    app_port = app.getsockname()[1]
    backend_port = backend.getsockname()[1]
    dual_port = dual.getsockname()[1]
    say("app %d" % app_port)
    say("backend %d" % backend_port)
    say("dual %d" % dual_port)

    held = []

    def hold(kind, sock):
        held.append(sock)
        say("sock %s %d %s %s" % (kind, sock.fileno(), fmt(sock.getsockname()), fmt(sock.getpeername())))

    # The server end is held: the accepted socket stays, the connecting one is closed.
    for _ in range(2):
        c = connect(socket.AF_INET, "127.0.0.3", ("127.0.0.1", app_port))
        a, _ = app.accept()
        c.close()
        hold("server", a)
    # The client end is held: a pool's connection the backend closed.
    for _ in range(3):
        c = connect(socket.AF_INET, "127.0.0.1", (args.backend, backend_port))
        a, _ = backend.accept()
        a.close()
        hold("client", c)
    c = connect(socket.AF_INET, "127.0.0.4", ("127.0.0.1", dual_port))
    a, _ = dual.accept()
    c.close()
    hold("mapped", a)
    c = connect(socket.AF_INET6, "::1", ("::1", dual_port))
    a, _ = dual.accept()
    a.close()
    hold("v6", c)

    if args.pid_file:
        with open(args.pid_file, "w") as f:
            f.write("%d\n" % os.getpid())
    say("ready")
    sys.stdin.read()


if __name__ == "__main__":
    main()

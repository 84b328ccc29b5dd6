#!/usr/bin/python3
"""A deliberately leaky TCP echo server in Python 3 (stdlib only), for cwreap's tests.

    leaky.py --mode abandon|selectors|thread [--listen ADDR]... [--fill N] [--on-term count]

ADDR is HOST:PORT, IPv6 as [HOST]:PORT (default 127.0.0.1:0). stdout, one event per line,
flushed: `listen ADDR` per listener, `ready`, `accepted FD LOCAL REMOTE`, `eof FD` (the peer
half-closed), `released FD` (we closed FD), `error TEXT`.

--fill N opens N more fds (of /dev/null) and keeps them, to bring the process near its fd
limit. --on-term count makes SIGTERM print `signal 15` instead of ending the process (and
SIGWINCH print `signal 28`).

Modes, each leaking the server side of a half-closed connection in CLOSE_WAIT:

abandon    thread per connection. It waits for the first bytes with a MSG_PEEK; a client
           that hangs up before sending anything is abandoned: the socket object goes to a
           list and is never read again (the FIN stays unread: CLOSE_WAIT with recv_q 1)
           nor closed. A client that sends data is echoed; at its EOF it is abandoned too.
selectors  one thread, an epoll event loop. On recv() == b'' the socket stays registered
           and is never closed ("eof_ignored"). Connections are registered edge-triggered:
           level-triggered, a registered socket at EOF is reported readable on every poll
           and the loop would spin. When the socket is later shut down from outside
           (EPOLLHUP) the loop unregisters and closes it, and says `released FD`.
thread     thread per connection, echoing. On EOF the thread returns without close(); the
           socket stays in a global list so the garbage collector cannot close it.
"""

import argparse
import os
import select
import signal
import socket
import sys
import threading

_out_lock = threading.Lock()
# Everything leaked stays referenced here, so no finalizer ever closes it.
LEAKED = []


def say(line):
    with _out_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def fmt(addr):
    host, port = addr[0], addr[1]
    if ":" in host:
        return "[%s]:%d" % (host, port)
    return "%s:%d" % (host, port)


def parse_listen(text):
    host, _, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        return socket.AF_INET6, host[1:-1], int(port)
    return socket.AF_INET, host, int(port)


def listeners(addrs):
    out = []
    for text in addrs:
        family, host, port = parse_listen(text)
        ls = socket.socket(family, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((host, port))
        ls.listen(128)
        out.append(ls)
    for ls in out:
        say("listen " + fmt(ls.getsockname()))
    return out


def announce(conn):
    say("accepted %d %s %s" % (conn.fileno(), fmt(conn.getsockname()), fmt(conn.getpeername())))


def leak(conn, fd):
    say("eof %d" % fd)
    with _out_lock:
        LEAKED.append(conn)


def echo_until_eof(conn, fd):
    """Echo until EOF, then leak. Errors (a reset) end the thread; the socket is kept."""
    try:
        while True:
            data = conn.recv(65536)
            if not data:
                leak(conn, fd)
                return
            conn.sendall(data)
    except OSError as e:
        say("error fd %d: %s" % (fd, e))
        with _out_lock:
            LEAKED.append(conn)


def abandon_handler(conn):
    fd = conn.fileno()
    try:
        first = conn.recv(1, socket.MSG_PEEK)
    except OSError as e:
        say("error fd %d: %s" % (fd, e))
        with _out_lock:
            LEAKED.append(conn)
        return
    if not first:
        # The client left before sending a request: forget the socket, unread and open.
        leak(conn, fd)
        return
    echo_until_eof(conn, fd)


def thread_handler(conn):
    echo_until_eof(conn, conn.fileno())


def serve_threads(lss, handler):
    def accept_loop(ls):
        while True:
            conn, _ = ls.accept()
            announce(conn)
            threading.Thread(target=handler, args=(conn,), daemon=True).start()

    threads = [threading.Thread(target=accept_loop, args=(ls,), daemon=True) for ls in lss]
    for t in threads:
        t.start()
    say("ready")
    for t in threads:
        t.join()


def serve_selectors(lss):
    ep = select.epoll()
    by_fd = {}
    for ls in lss:
        ls.setblocking(False)
        ep.register(ls.fileno(), select.EPOLLIN)
        by_fd[ls.fileno()] = ("listener", ls)
    conns = {}  # fd -> {"sock", "out", "state"}
    conn_events = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
    say("ready")

    def release(fd):
        c = conns.pop(fd)
        ep.unregister(fd)
        c["sock"].close()
        say("released %d" % fd)

    def flush_out(fd, c):
        while c["out"]:
            try:
                n = c["sock"].send(c["out"])
            except BlockingIOError:
                ep.modify(fd, conn_events | select.EPOLLOUT)
                return
            c["out"] = c["out"][n:]
        ep.modify(fd, conn_events)

    while True:
        for fd, ev in ep.poll():
            if fd in by_fd:
                ls = by_fd[fd][1]
                while True:
                    try:
                        conn, _ = ls.accept()
                    except BlockingIOError:
                        break
                    conn.setblocking(False)
                    announce(conn)
                    conns[conn.fileno()] = {"sock": conn, "out": b"", "state": "open"}
                    ep.register(conn.fileno(), conn_events)
                continue
            c = conns.get(fd)
            if c is None:
                continue
            if ev & (select.EPOLLHUP | select.EPOLLERR):
                # Shut down (from outside, or reset): the socket is dead; close it.
                release(fd)
                continue
            if c["state"] == "open" and ev & (select.EPOLLIN | select.EPOLLRDHUP):
                try:
                    while True:
                        try:
                            data = c["sock"].recv(65536)
                        except BlockingIOError:
                            break
                        if not data:
                            c["state"] = "eof_ignored"
                            say("eof %d" % fd)
                            break
                        c["out"] += data
                except OSError as e:
                    say("error fd %d: %s" % (fd, e))
                    release(fd)
                    continue
            if c["out"]:
                try:
                    flush_out(fd, c)
                except OSError as e:
                    say("error fd %d: %s" % (fd, e))
                    release(fd)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["abandon", "selectors", "thread"], required=True)
    p.add_argument("--listen", action="append")
    p.add_argument("--fill", type=int, default=0)
    p.add_argument("--on-term", choices=["exit", "count"], default="exit")
    args = p.parse_args()
    if args.on_term == "count":
        # SIGWINCH too, as a marker a test can send: Python runs pending handlers in signal
        # number order, so a SIGTERM that came before it is always printed before it.
        for sig in (signal.SIGTERM, signal.SIGWINCH):
            signal.signal(sig, lambda signum, frame: say("signal %d" % signum))
    filler = [os.open("/dev/null", os.O_RDONLY) for _ in range(args.fill)]
    LEAKED.append(filler)
    lss = listeners(args.listen or ["127.0.0.1:0"])
    if args.mode == "selectors":
        serve_selectors(lss)
    elif args.mode == "abandon":
        serve_threads(lss, abandon_handler)
    else:
        serve_threads(lss, thread_handler)


if __name__ == "__main__":
    main()

#!/usr/bin/python3
"""A server that sends a heartbeat on every session it holds and never notices a peer leave.

    heartbeat.py [--listen HOST:PORT] [--every SECONDS]

It accepts connections and, every SECONDS (default 1), writes `hb\\n` to each one it still
holds. It never reads, so it never sees a peer's data nor its FIN, and it never closes:
a peer that half-closes leaves the socket in CLOSE_WAIT, and since that peer still ACKs
every heartbeat, the socket's tcp_info last_ack_recv stays under SECONDS however long it
has been in CLOSE_WAIT.

stdout, one line per event, flushed: `listen ADDR`, `ready`, `accepted FD LOCAL REMOTE`,
`error TEXT`. A write that fails (the peer reset the connection) is reported as `error`
once per session, and the socket is kept all the same.
"""

import argparse
import socket
import sys
import threading
import time


def say(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def fmt(addr):
    host, port = addr[0], addr[1]
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--every", type=float, default=1.0)
    args = ap.parse_args()
    host, port = args.listen.rsplit(":", 1)
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server = socket.socket(family, socket.SOCK_STREAM)
    server.bind((host, int(port)))
    server.listen(128)
    say("listen " + fmt(server.getsockname()))

    lock = threading.Lock()
    # Every accepted socket, kept to the end: no finalizer may close one.
    sessions = []
    failed = set()

    def beat():
        while True:
            time.sleep(args.every)
            with lock:
                held = list(sessions)
            for conn in held:
                try:
                    conn.send(b"hb\n")
                except OSError as e:
                    if conn.fileno() not in failed:
                        failed.add(conn.fileno())
                        say("error fd %d: %s" % (conn.fileno(), e))

    threading.Thread(target=beat, daemon=True).start()
    say("ready")
    while True:
        conn, peer = server.accept()
        with lock:
            sessions.append(conn)
        say("accepted %d %s %s" % (conn.fileno(), fmt(conn.getsockname()), fmt(peer)))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""A server that accepts only when told, so that connections wait in its accept queue.

    late_accept.py

Listens on 127.0.0.1 (a free port) and prints `listening PORT`. Each `accept` line on stdin
accepts one connection and prints `accepted FD`. It never closes what it accepted, nor
reads from it: a connection whose peer closed stays in CLOSE_WAIT, first in the queue (no
fd anywhere), then as the fd it printed.
"""
import socket
import sys

listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", 0))
listener.listen(64)
print("listening", listener.getsockname()[1], flush=True)
held = []
for line in sys.stdin:
    if line.strip() == "accept":
        conn, _ = listener.accept()
        held.append(conn)
        print("accepted", conn.fileno(), flush=True)

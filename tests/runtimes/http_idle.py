#!/usr/bin/python3
"""A local HTTP/1.1 keep-alive server that closes connections idle for more than 1 s.

    http_idle.py [--idle SECONDS] [--gather N]

Every response is 200 with the request's path as its body, so a client can tell its own
response from another's. A connection with no request for SECONDS (default 1) is closed by
the server: a client pool that keeps it (urllib3, most pools) holds a socket in CLOSE_WAIT
until it next uses it. With --gather N, a request for a path under /gather/ is answered only
once N of them have arrived, so N requests sent at once hold N connections at the same time
(a pool fills to N whatever the scheduler does). stdout: `listen ADDR`, then `ready`.
"""

import argparse
import http.server
import socketserver
import sys
import threading


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    gather = None

    def do_GET(self):
        if self.path.startswith("/gather/") and Handler.gather is not None:
            # Only a guard against a hang: the test sends all N at once.
            Handler.gather.wait(timeout=120)
        body = self.path.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--idle", type=float, default=1.0)
    p.add_argument("--gather", type=int)
    args = p.parse_args()
    if args.gather:
        Handler.gather = threading.Barrier(args.gather)
    # An idle keep-alive connection times out in readline() and the handler closes it.
    Handler.timeout = args.idle
    srv = Server(("127.0.0.1", 0), Handler)
    host, port = srv.server_address[:2]
    sys.stdout.write("listen %s:%d\nready\n" % (host, port))
    sys.stdout.flush()
    srv.serve_forever()


if __name__ == "__main__":
    main()

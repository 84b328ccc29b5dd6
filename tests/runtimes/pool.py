#!/usr/bin/python3
"""A urllib3 keep-alive connection pool, as client programs use one (Debian's python3-urllib3).

    pool.py ADDR [--size N]

stdin commands, one per line; each answers on stdout:
  fill N      N requests at once (under /gather/, for a server run with --gather N), so the
              pool holds N keep-alive connections; `filled N`.
  request K   K requests one after the other, each to a unique path; for each, `ok ID` when
              the answer is 200 with its own path as the body, else `bad ID WHAT`; then
              `done K`.
  fds         the pool's socket fds, one line `fds FD...`.
A server that closes idle connections leaves the pool's sockets in CLOSE_WAIT until the
pool next uses them.
"""

import argparse
import sys
import threading

import urllib3


def say(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("addr")
    p.add_argument("--size", type=int, default=40)
    args = p.parse_args()
    host, _, port = args.addr.rpartition(":")
    pool = urllib3.HTTPConnectionPool(
        host, int(port), maxsize=args.size, block=True, retries=False, timeout=10
    )
    counter = [0]
    lock = threading.Lock()

    def next_id():
        with lock:
            counter[0] += 1
            return counter[0]

    def one(results, prefix="/req/"):
        rid = next_id()
        path = "%s%d" % (prefix, rid)
        try:
            r = pool.request("GET", path, preload_content=True)
            if r.status == 200 and r.data.decode() == path:
                results.append("ok %d" % rid)
            else:
                results.append("bad %d status %d body %r" % (rid, r.status, r.data[:40]))
        except Exception as e:  # noqa: BLE001 - the test reports whatever went wrong
            results.append("bad %d %s" % (rid, type(e).__name__))

    say("ready")
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "fill":
            n = int(words[1])
            results = []
            barrier = threading.Barrier(n)

            def hold():
                barrier.wait()
                one(results, "/gather/")

            threads = [threading.Thread(target=hold) for _ in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for r in results:
                if not r.startswith("ok"):
                    say(r)
            say("filled %d" % n)
        elif words[0] == "request":
            k = int(words[1])
            for _ in range(k):
                results = []
                one(results)
                say(results[0])
            say("done %d" % k)
        elif words[0] == "fds":
            fds = []
            for conn in list(pool.pool.queue):
                sock = getattr(conn, "sock", None) if conn is not None else None
                if sock is not None:
                    fds.append(str(sock.fileno()))
            say("fds " + " ".join(fds))


if __name__ == "__main__":
    main()

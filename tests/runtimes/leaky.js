// A deliberately leaky TCP echo server in Node, for cwreap's tests.
//
//     node leaky.js [--listen ADDR]...
//
// ADDR is HOST:PORT, IPv6 as [HOST]:PORT (default 127.0.0.1:0). stdout, one event per line:
// `listen ADDR` per listener, `ready`, `accepted FD LOCAL REMOTE`, `eof FD` (the peer
// half-closed), `released FD` (Node closed the handle), `error TEXT`.
//
// `allowHalfOpen: true` and no end()/destroy() on 'end': a half-closed connection is never
// ended, so its socket stays in CLOSE_WAIT. The sockets are also kept in a list.
"use strict";
const net = require("net");

const leaked = [];

function say(line) {
  // process.stdout is synchronous for pipes and files on Linux.
  process.stdout.write(line + "\n");
}

function fmt(host, port) {
  return host.includes(":") ? `[${host}]:${port}` : `${host}:${port}`;
}

function parseListen(text) {
  const i = text.lastIndexOf(":");
  let host = text.slice(0, i);
  if (host.startsWith("[") && host.endsWith("]")) host = host.slice(1, -1);
  return { host, port: Number(text.slice(i + 1)) };
}

const args = process.argv.slice(2);
const addrs = [];
for (let i = 0; i < args.length; i++) {
  if (args[i] === "--listen" && i + 1 < args.length) {
    addrs.push(args[++i]);
  } else {
    process.stderr.write(`usage: node leaky.js [--listen ADDR]...\n`);
    process.exit(2);
  }
}
if (addrs.length === 0) addrs.push("127.0.0.1:0");

function onConnection(sock) {
  const fd = sock._handle.fd;
  say(
    `accepted ${fd} ${fmt(sock.localAddress, sock.localPort)} ${fmt(sock.remoteAddress, sock.remotePort)}`
  );
  sock.on("data", (d) => sock.write(d));
  sock.on("end", () => {
    say(`eof ${fd}`);
    leaked.push(sock);
  });
  sock.on("error", (e) => say(`error fd ${fd}: ${e.message}`));
  sock.on("close", () => say(`released ${fd}`));
}

const servers = addrs.map(() => net.createServer({ allowHalfOpen: true }, onConnection));
Promise.all(
  addrs.map(
    (text, i) =>
      new Promise((resolve, reject) => {
        const { host, port } = parseListen(text);
        servers[i].once("error", reject);
        servers[i].listen(port, host, resolve);
      })
  )
).then(
  () => {
    for (const s of servers) {
      const a = s.address();
      say(`listen ${fmt(a.address, a.port)}`);
    }
    say("ready");
  },
  (e) => {
    say(`error listen: ${e.message}`);
    process.exit(1);
  }
);

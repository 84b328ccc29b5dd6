// A Node http server whose handler never responds and never reads the request body, for
// cwreap's tests.
//
//     node http_paused.js [--listen ADDR]
//
// ADDR is HOST:PORT (default 127.0.0.1:0). stdout, one event per line: `listen ADDR`,
// `ready`, `accepted FD LOCAL REMOTE` per connection, `request FD METHOD PATH` when the
// handler is called, `paused FD` when Node stops reading the connection, `released FD` when
// Node closes it.
//
// The body of a request nobody reads fills the request's buffer; the http server then
// pauses the socket (backpressure: libuv's uv_read_stop), and libuv drops the fd from its
// epoll set at the next event on it. The peer's FIN stays unread behind the rest of the
// body, so the socket sits in CLOSE_WAIT, paused, never watched again. requestTimeout is off,
// as on servers that raise it for slow uploads: nothing ever ends the connection.
"use strict";
const http = require("http");

function say(line) {
  // process.stdout is synchronous for pipes and files on Linux.
  process.stdout.write(line + "\n");
}

function fmt(host, port) {
  return host.includes(":") ? `[${host}]:${port}` : `${host}:${port}`;
}

const args = process.argv.slice(2);
let listen = "127.0.0.1:0";
for (let i = 0; i < args.length; i++) {
  if (args[i] === "--listen" && i + 1 < args.length) {
    listen = args[++i];
  } else {
    process.stderr.write(`usage: node http_paused.js [--listen ADDR]\n`);
    process.exit(2);
  }
}

const held = [];
const server = http.createServer((req, res) => {
  // Never respond, never read the body: keep both, so nothing is collected either.
  held.push([req, res]);
  say(`request ${req.socket._handle.fd} ${req.method} ${req.url}`);
});
server.requestTimeout = 0;
server.on("connection", (sock) => {
  const fd = sock._handle.fd;
  say(
    `accepted ${fd} ${fmt(sock.localAddress, sock.localPort)} ${fmt(sock.remoteAddress, sock.remotePort)}`
  );
  sock.on("pause", () => say(`paused ${fd}`));
  sock.on("close", () => say(`released ${fd}`));
});

const i = listen.lastIndexOf(":");
let host = listen.slice(0, i);
if (host.startsWith("[") && host.endsWith("]")) host = host.slice(1, -1);
server.once("error", (e) => {
  say(`error listen: ${e.message}`);
  process.exit(1);
});
server.listen(Number(listen.slice(i + 1)), host, () => {
  const a = server.address();
  say(`listen ${fmt(a.address, a.port)}`);
  say("ready");
});

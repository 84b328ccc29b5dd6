// explain --where's Node server: a 'L' connection's 'end' handler (leakConn) forgets the
// socket; a 'C' connection's (tidyConn) ends it. libuv's loop reads every EOF, so its
// stack shows the loop, which the report must say. Run with --perf-basic-prof. Prints
// "listening PORT" once it accepts.
const net = require('net');
const held = [];

function leakConn(sock) {
  sock.on('end', () => { held.push(sock); }); // where: leak
}

function tidyConn(sock) {
  sock.on('end', () => { sock.destroy(); }); // where: tidy
}

const server = net.createServer({ allowHalfOpen: true }, (sock) => {
  sock.once('data', (d) => {
    if (d[0] === 0x4c) leakConn(sock); else tidyConn(sock);
    sock.resume();
  });
});
server.listen(0, '127.0.0.1', () => {
  console.log(`listening ${server.address().port}`);
});

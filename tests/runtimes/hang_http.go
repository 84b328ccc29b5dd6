// A Go net/http server whose handler never returns, for cwreap's tests of keepalive and
// dead held sockets (stdlib only).
//
//	hang-http [--listen ADDR]
//
// ADDR is HOST:PORT (default 127.0.0.1:0). The listener comes from net.Listen and is served
// by a plain http.Server, so accepted connections get Go's default TCP keepalive (15 s).
// Every request blocks its handler forever: the handler never writes, never returns, and
// the server never closes the connection, so once the client closes its end the socket
// stays in CLOSE_WAIT (and, after a keepalive probe meets RST, in CLOSE) while the fd is
// held. stdout, one event per line: `listen ADDR`, `ready`, `request FD LOCAL REMOTE`
// (the handler is running; FD is the kernel fd of the connection), `error TEXT`.
//
// The fd number is read with syscall.RawConn.Control (File() would dup it).
package main

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"sync"
)

type connKey struct{}

var outMu sync.Mutex

func say(format string, a ...interface{}) {
	outMu.Lock()
	defer outMu.Unlock()
	fmt.Fprintf(os.Stdout, format+"\n", a...)
}

func fdOf(c net.Conn) int {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return -1
	}
	raw, err := tc.SyscallConn()
	if err != nil {
		return -1
	}
	fd := -1
	if err := raw.Control(func(f uintptr) { fd = int(f) }); err != nil {
		return -1
	}
	return fd
}

func main() {
	addr := "127.0.0.1:0"
	args := os.Args[1:]
	for i := 0; i < len(args); i++ {
		if args[i] == "--listen" && i+1 < len(args) {
			i++
			addr = args[i]
		} else {
			fmt.Fprintln(os.Stderr, "usage: hang-http [--listen ADDR]")
			os.Exit(2)
		}
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		say("error listen %s: %v", addr, err)
		os.Exit(1)
	}
	hang := make(chan struct{})
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			c, _ := r.Context().Value(connKey{}).(net.Conn)
			if c == nil {
				say("error no connection in the request context")
				return
			}
			say("request %d %s %s", fdOf(c), c.LocalAddr(), c.RemoteAddr())
			// Blocks forever, whatever the client does: the request's context is
			// cancelled when the client goes away, and this handler ignores it.
			<-hang
		}),
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			return context.WithValue(ctx, connKey{}, c)
		},
	}
	say("listen %s", ln.Addr())
	say("ready")
	if err := srv.Serve(ln); err != nil {
		say("error serve: %v", err)
		os.Exit(1)
	}
}

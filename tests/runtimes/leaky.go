// A deliberately leaky TCP echo server in Go (stdlib only), for cwreap's tests.
//
//	leaky-go [--listen ADDR]...
//
// ADDR is HOST:PORT, IPv6 as [HOST]:PORT (default 127.0.0.1:0). stdout, one event per line:
// `listen ADDR` per listener, `ready`, `accepted FD LOCAL REMOTE`, `eof FD` (the peer
// half-closed), `error TEXT`.
//
// A goroutine per connection echoes; at EOF it returns without Close(), and the net.Conn
// stays in a global slice, so no finalizer ever closes it: the socket stays in CLOSE_WAIT.
// The fd number is read with syscall.RawConn.Control (File() would dup it).
package main

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
)

var (
	outMu  sync.Mutex
	leakMu sync.Mutex
	leaked []net.Conn
)

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

func handle(c net.Conn) {
	fd := fdOf(c)
	say("accepted %d %s %s", fd, c.LocalAddr(), c.RemoteAddr())
	buf := make([]byte, 65536)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				say("error fd %d: %v", fd, werr)
			}
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				say("eof %d", fd)
			} else {
				say("error fd %d: %v", fd, err)
			}
			leakMu.Lock()
			leaked = append(leaked, c)
			leakMu.Unlock()
			return
		}
	}
}

func main() {
	var addrs []string
	args := os.Args[1:]
	for i := 0; i < len(args); i++ {
		if args[i] == "--listen" && i+1 < len(args) {
			i++
			addrs = append(addrs, args[i])
		} else {
			fmt.Fprintln(os.Stderr, "usage: leaky-go [--listen ADDR]...")
			os.Exit(2)
		}
	}
	if len(addrs) == 0 {
		addrs = []string{"127.0.0.1:0"}
	}
	var lns []net.Listener
	for _, a := range addrs {
		ln, err := net.Listen("tcp", a)
		if err != nil {
			say("error listen %s: %v", a, err)
			os.Exit(1)
		}
		lns = append(lns, ln)
	}
	for _, ln := range lns {
		say("listen %s", ln.Addr())
	}
	var wg sync.WaitGroup
	for _, ln := range lns {
		wg.Add(1)
		go func(ln net.Listener) {
			defer wg.Done()
			for {
				c, err := ln.Accept()
				if err != nil {
					say("error accept: %v", err)
					return
				}
				go handle(c)
			}
		}(ln)
	}
	say("ready")
	wg.Wait()
}

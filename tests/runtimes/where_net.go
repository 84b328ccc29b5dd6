// explain --where's Go server on the net package: each connection's goroutine reads a
// command byte, then reads until EOF in leakConn (never closes: the leak) or in tidyConn
// (closes). Prints "listening PORT" once it accepts.
package main

import (
	"fmt"
	"net"
	"os"
)

var sink byte

//go:noinline
func leakConn(c net.Conn) {
	buf := make([]byte, 256)
	for {
		n, err := c.Read(buf) // where: leak
		if err != nil {
			return // EOF: returns with the connection open
		}
		sink = buf[n-1]
	}
}

//go:noinline
func tidyConn(c net.Conn) {
	buf := make([]byte, 256)
	for {
		n, err := c.Read(buf) // where: tidy
		if err != nil {
			c.Close()
			return
		}
		sink = buf[n-1]
	}
}

var held []net.Conn

func handle(c net.Conn) {
	cmd := make([]byte, 1)
	if _, err := c.Read(cmd); err != nil {
		c.Close()
		return
	}
	if cmd[0] == 'L' {
		leakConn(c)
	} else {
		tidyConn(c)
	}
}

func main() {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Printf("listening %d\n", l.Addr().(*net.TCPAddr).Port)
	for {
		c, err := l.Accept()
		if err != nil {
			continue
		}
		// Referenced, so no finalizer closes a leaked one.
		held = append(held, c)
		go handle(c)
	}
}

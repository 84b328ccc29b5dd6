// explain --where's Go net/http server: /hang never returns and ignores r.Context(), so
// when the client closes, net/http's background read takes the EOF and the connection
// stays; /ok returns, and the server closes the connection at the client's EOF. Prints
// "listening PORT" once it accepts.
package main

import (
	"fmt"
	"net"
	"net/http"
	"os"
)

func hang(w http.ResponseWriter, r *http.Request) {
	select {} // the handler does not return
}

func ok(w http.ResponseWriter, r *http.Request) {
	fmt.Fprintln(w, "ok")
}

func main() {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Printf("listening %d\n", l.Addr().(*net.TCPAddr).Port)
	http.HandleFunc("/hang", hang)
	http.HandleFunc("/ok", ok)
	http.Serve(l, nil)
}

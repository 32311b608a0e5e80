// Command httptarget is the demo's private HTTP service: it answers every
// request with a page naming the address it saw the request come from,
// which is the agent's, not the client's.
package main

import (
	"flag"
	"fmt"
	"log"
	"net/http"
)

func main() {
	addr := flag.String("listen", "127.0.0.1:18080", "listen address")
	flag.Parse()
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from the private target %s: your request came through the vpcreach tunnel (connection from %s)\n", *addr, r.RemoteAddr)
	})
	log.Fatal(http.ListenAndServe(*addr, nil))
}

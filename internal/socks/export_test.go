package socks

import "net"

// SetTestHook makes f run first for every connection s serves, inside
// its panic recovery. Set it before Serve.
func SetTestHook(s *Server, f func(net.Conn)) { s.testHook = f }

// OpenConns is the number of connections s is serving.
func OpenConns(s *Server) int64 { return s.open.Load() }

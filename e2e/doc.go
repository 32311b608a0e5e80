// Package e2e holds vpcreach's in-process end-to-end tests: real proxy
// servers, agents and SOCKS5 front ends on loopback, with real TCP
// targets, wired exactly as the binaries wire them.
package e2e

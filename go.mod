module github.com/vpcreach/vpcreach

go 1.26.8

require (
	github.com/hashicorp/yamux v0.1.2
	github.com/redis/go-redis/v9 v9.23.0
	github.com/things-go/go-socks5 v0.1.1
	go.uber.org/goleak v1.3.0
	go.yaml.in/yaml/v3 v3.0.6
	golang.org/x/sys v0.50.0
)

require (
	github.com/cespare/xxhash/v2 v2.3.0 // indirect
	go.uber.org/atomic v1.12.0 // indirect
)

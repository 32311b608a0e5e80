#!/usr/bin/env bash
# Local demo of vpcreach on loopback: a private HTTP service reached through
# agent -> proxyserver -> socks5d, with the configs in configs/demo/.
#
#   make demo        (or: bash scripts/demo.sh)
#
# Exits 0 only if the demo page came through both the SOCKS5 front end and
# the plain proxy port. Every process it starts is stopped on exit.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

API=http://127.0.0.1:17070
SOCKS=127.0.0.1:11080
TARGET=127.0.0.1:18080
PAGE_TEXT="hello from the private target"
DEADLINE_SECS=${DEMO_TIMEOUT:-20}

say() { printf '==> %s\n' "$*"; }
die() { printf 'demo: %s\n' "$*" >&2; exit 1; }

command -v curl >/dev/null 2>&1 ||
	die "curl is not installed; it is the demo's SOCKS5 client (Debian: apt-get install curl)"
command -v go >/dev/null 2>&1 || die "go is not on PATH (try PATH=/usr/local/go/bin:\$PATH)"

# The demo uses fixed ports; refuse to start on top of an earlier run.
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in 17000 17001 17070 11080 18080; do
	if port_busy "$p"; then
		die "port 127.0.0.1:$p is already in use (an earlier demo still running?); stop it and retry"
	fi
done

say "building agent, proxyserver, socks5d and httptarget into ./bin"
go build -ldflags "-X github.com/vpcreach/vpcreach/internal/cli.Version=${VERSION:-dev}" \
	-o bin/ ./cmd/... ./internal/demo/httptarget

VPCREACH_TOKEN=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')
export VPCREACH_TOKEN
LOGDIR=$(mktemp -d "${TMPDIR:-/tmp}/vpcreach-demo.XXXXXX")

declare -A PIDS=()   # name -> pid
ORDER=()             # start order
OK=0

cleanup() {
	local rc=$? name pid i deadline
	trap - EXIT INT TERM
	# Stop in reverse start order: the agent withdraws before its server
	# drains, so nobody waits out a grace period.
	for ((i = ${#ORDER[@]} - 1; i >= 0; i--)); do
		name=${ORDER[i]} pid=${PIDS[$name]}
		kill -TERM "$pid" 2>/dev/null || continue
		deadline=$((SECONDS + 10))
		while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.05; done
		if kill -0 "$pid" 2>/dev/null; then
			echo "demo: $name did not stop within 10s of SIGTERM; killing it" >&2
			kill -KILL "$pid" 2>/dev/null || true
		fi
		wait "$pid" 2>/dev/null || true
	done
	if ((OK)); then
		say "stopped everything; demo OK"
		rm -rf "$LOGDIR"
	else
		for name in "${ORDER[@]}"; do
			echo "----- last lines of $LOGDIR/$name.log -----" >&2
			tail -n 20 "$LOGDIR/$name.log" >&2 || true
		done
		echo "demo FAILED; logs kept in $LOGDIR" >&2
		((rc != 0)) || rc=1
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start() { # name args...
	local name=$1
	shift
	"$@" >"$LOGDIR/$name.log" 2>&1 &
	PIDS[$name]=$!
	ORDER+=("$name")
}

# wait_for "what" cmd...: polls cmd until it succeeds or the deadline
# passes, failing early if a started process died.
wait_for() {
	local what=$1 name deadline=$((SECONDS + DEADLINE_SECS))
	shift
	until "$@"; do
		for name in "${ORDER[@]}"; do
			kill -0 "${PIDS[$name]}" 2>/dev/null || die "$name exited while waiting for $what"
		done
		((SECONDS < deadline)) || die "timed out after ${DEADLINE_SECS}s waiting for $what"
		sleep 0.1
	done
}

say "starting httptarget, proxyserver, agent and socks5d (logs in $LOGDIR)"
start httptarget bin/httptarget -listen "$TARGET"
start proxyserver bin/proxyserver -config configs/demo/proxyserver.yaml
start agent bin/agent -config configs/demo/agent.yaml
start socks5d bin/socks5d -config configs/demo/socks5d.yaml

routes() { curl -sSf --noproxy '*' --max-time 2 "$API/v1/routes" 2>/dev/null; }
have_route() { [[ $(routes) == *'"proxy"'* ]]; }
socks_up() { port_busy "${SOCKS##*:}"; }

say "waiting for the agent's route to appear in the lookup API ($API/v1/routes)"
wait_for "a route in $API/v1/routes" have_route
wait_for "socks5d to listen on $SOCKS" socks_up

# The route table: one line per route, from the API's indented JSON.
table=$(routes | awk -F'"' '
	/"(network|target|proxy|relay|agent)":/ { v[$2] = $4 }
	/^  }/ {
		t = (v["network"] != "" ? v["network"] "/" : "") v["target"]
		printf "%-24s %-22s %-22s %s\n", t, v["proxy"], v["relay"], v["agent"]
		delete v
	}')
say "route table (target -> proxy port on the server, via relay, for agent):"
printf '%-24s %-22s %-22s %s\n' TARGET PROXY RELAY AGENT
printf '%s\n' "$table"
PROXY=$(printf '%s\n' "$table" | awk -v t="$TARGET" '$1 == t { print $2; exit }')
[[ -n $PROXY ]] || die "no route for $TARGET in the lookup API"

# --noproxy '' keeps a NO_PROXY setting from sending curl around socks5d.
say "curl -sS --socks5-hostname $SOCKS http://$TARGET/"
page=$(curl -sS --max-time 10 --noproxy '' --socks5-hostname "$SOCKS" "http://$TARGET/") ||
	die "curl through socks5d failed"
printf '%s\n' "$page"
[[ $page == *"$PAGE_TEXT"* ]] || die "the page through socks5d does not say \"$PAGE_TEXT\""

say "curl -sS http://$PROXY/   (the plain proxy port from the route)"
page=$(curl -sS --noproxy '*' --max-time 10 "http://$PROXY/") || die "curl to the proxy port $PROXY failed"
printf '%s\n' "$page"
[[ $page == *"$PAGE_TEXT"* ]] || die "the page through the proxy port does not say \"$PAGE_TEXT\""

say "the page came through; stopping everything"
OK=1

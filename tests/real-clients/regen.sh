#!/bin/sh
# Regenerates everything under tests/fixtures/real-clients/ (and goclient/client.pb.go) from
# Debian bookworm's Go packages. Offline: GOPATH mode over /usr/share/gocode, no module proxy.
#
#   apt-get install golang-go golang-google-grpc-dev golang-golang-x-net-dev \
#                   golang-github-golang-protobuf-1-3-dev          # build and run
#   apt-get install protobuf-compiler protoc-gen-go-1-3            # only to regenerate client.pb.go
#
# Usage: tests/real-clients/regen.sh            (from anywhere)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out="$root/tests/fixtures/real-clients"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

export GO111MODULE=off GOPATH=/usr/share/gocode GOPROXY=off GOFLAGS= CGO_ENABLED=0
export GOCACHE="$work/gocache"

# 1. Packet types and the ProxyService stub, generated from Spoke's copy of upstream's
#    client.proto by Debian's protoc 3.21 + protoc-gen-go 1.3.5 (plugins=grpc), the generator
#    generation konnectivity-client used before protoc-gen-go-grpc. One package: package main.
if command -v protoc >/dev/null && command -v protoc-gen-go >/dev/null; then
    protoc -I "$root/proto/proto" --go_out=plugins=grpc:"$work" \
        konnectivity-client/proto/client/client.proto
    sed 's/^package client$/package main/' \
        "$work/sigs.k8s.io/apiserver-network-proxy/konnectivity-client/proto/client/client.pb.go" \
        > "$here/goclient/client.pb.go"
else
    echo "protoc / protoc-gen-go missing: keeping the committed goclient/client.pb.go" >&2
fi

# 2. The client program (grpc-go 1.33.3, golang.org/x/net 0.7.0 from Debian).
(cd "$here/goclient" && go build -o "$work/goclient" .)

# 3. Fixtures: first flights encoded by x/net/http2's framer and HPACK encoder, and a capture
#    of the real client's whole Proxy exchange.
"$work/goclient" first-flights -out "$out"
# kube-apiserver's target (the socket path), a unix: target and an empty endpoint.
"$work/goclient" capture -out "$out/grpc-go-1.33.3-raw-path-captured.h2" \
    -target /etc/kubernetes/konnectivity-server/konnectivity-server.socket
"$work/goclient" capture -out "$out/grpc-go-1.33.3-unix-localhost-captured.h2" \
    -target unix:///etc/kubernetes/konnectivity-server/konnectivity-server.socket
"$work/goclient" capture -out "$out/grpc-go-1.33.3-empty-authority-captured.h2" \
    -target passthrough:///
# Two tunnels on one connection, a stream each (konnectivity-client master's CreateGRPCTunnel).
"$work/goclient" capture -out "$out/grpc-go-1.33.3-raw-path-two-streams-captured.h2" \
    -target /etc/kubernetes/konnectivity-server/konnectivity-server.socket -tunnels 2
echo "fixtures written to $out"

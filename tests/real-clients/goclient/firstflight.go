package main

import (
	"bytes"
	"flag"
	"fmt"
	"path/filepath"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// A first flight: what a grpc-go client writes before its first message — the preface, its
// SETTINGS, and the HEADERS of stream 1 — for one header list, in grpc-go's order.
type firstFlight struct {
	file   string
	client string // who sends this header list
	basis  string // where the header list comes from
	fields []hpack.HeaderField
	// streams > 1: the same request on streams 1, 3, ... of one connection, one HPACK encoder
	// (later blocks refer to the dynamic table the first one filled).
	streams int
}

func grpcRequest(scheme, path, authority string, withAuthority bool, userAgent string, metadata ...string) []hpack.HeaderField {
	h := []hpack.HeaderField{{Name: ":method", Value: "POST"}, {Name: ":scheme", Value: scheme}, {Name: ":path", Value: path}}
	// grpc-go always writes :authority (possibly empty); the "no authority" rows leave it out.
	if withAuthority {
		h = append(h, hpack.HeaderField{Name: ":authority", Value: authority})
	}
	h = append(h, hpack.HeaderField{Name: "content-type", Value: "application/grpc"},
		hpack.HeaderField{Name: "user-agent", Value: userAgent}, hpack.HeaderField{Name: "te", Value: "trailers"})
	for i := 0; i+1 < len(metadata); i += 2 {
		h = append(h, hpack.HeaderField{Name: metadata[i], Value: metadata[i+1]})
	}
	return h
}

const (
	kubeSocket        = "/etc/kubernetes/konnectivity-server/konnectivity-server.socket"
	encodedKubeSocket = "%2Fetc%2Fkubernetes%2Fkonnectivity-server%2Fkonnectivity-server.socket"
	proxyPath         = "/ProxyService/Proxy"
	agentPath         = "/AgentService/Connect"
	ua154             = "grpc-go/1.54.0"
)

// firstFlights is the table of header lists. The gRPC frontend over mTLS TCP gets the same lists
// with :scheme https (grpc-go's scheme with transport credentials).
func firstFlights() []firstFlight {
	var out []firstFlight
	proxy := []struct {
		name, client, basis, authority string
		withAuthority                  bool
		userAgent                      string
	}{
		{"grpc-go-1.54-raw-path", "grpc-go 1.54.0 (kube-apiserver 1.28, konnectivity-client, proxyProtocol GRPC)",
			"grpc-go 1.54 sets :authority to the dial target's endpoint unescaped; kube-apiserver's target is the socket path",
			kubeSocket, true, ua154},
		{"grpc-go-1.81-percent-path", "grpc-go 1.81.1 (upstream ANP v0.36 test-client, --proxy-uds)",
			"header list observed on the wire from upstream's test-client (tests' real-clients.md), in order",
			"%2Ftmp%2Fdbg%2Frec.sock", true, "test-client grpc-go/1.81.1"},
		{"grpc-go-1.54-unix-localhost", "grpc-go 1.54.0 with a unix: target (unix:///path)",
			"grpc-go sets :authority to \"localhost\" for unix: targets", "localhost", true, ua154},
		{"grpc-go-1.54-empty-authority", "grpc-go 1.54.0 with target \"passthrough:///\" and a custom dialer",
			"grpc-go sets :authority to the (empty) endpoint; still writes the field", "", true, ua154},
		{"grpc-go-1.54-no-authority", "a grpc-go 1.54.0 header list without :authority",
			"RFC 9113 8.3.1 lets a client omit :authority; same list as grpc-go's minus that field", "", false, ua154},
	}
	for _, p := range proxy {
		for _, t := range []struct{ suffix, scheme string }{{"h2c", "http"}, {"tls", "https"}} {
			out = append(out, firstFlight{
				file:   fmt.Sprintf("%s-%s.h2", p.name, t.suffix),
				client: p.client,
				basis:  p.basis,
				fields: grpcRequest(t.scheme, proxyPath, p.authority, p.withAuthority, p.userAgent),
			})
		}
	}
	// konnectivity-client master's CreateGRPCTunnel (kube-apiserver's cached connection): one
	// connection, one Proxy stream per dial; grpc-go 1.80 percent-encodes the socket path.
	out = append(out, firstFlight{
		file:    "grpc-go-1.80-percent-path-two-streams-h2c.h2",
		client:  "konnectivity-client master CreateGRPCTunnel (grpc-go 1.80.0): one connection, a Proxy stream per dial",
		basis:   "grpc-go >= 1.6x percent-encodes the target's endpoint; two requests from one encoder",
		fields:  grpcRequest("http", proxyPath, encodedKubeSocket, true, "grpc-go/1.80.0"),
		streams: 2,
	})
	// Upstream proxy-agent v0.36.0 (grpc-go 1.81.1): AppendToOutgoingContext(agentID,
	// agentIdentifiers) (+ authorization with --service-account-token-path). With --agent-cert the
	// TLS ServerName is --proxy-server-host and grpc-go uses it as :authority; without a client
	// cert (token mode) :authority is the dial target host:port.
	out = append(out,
		firstFlight{
			file:   "anp-0.36-agent-connect-cert.h2",
			client: "upstream proxy-agent v0.36.0 (grpc-go 1.81.1) with --agent-cert, --proxy-server-host=127.0.0.1",
			basis:  "pkg/agent/client.go Connect metadata; grpc-go authority from the TLS ServerName",
			fields: grpcRequest("https", agentPath, "127.0.0.1", true, "grpc-go/1.81.1",
				"agentid", "agent-upstream-1", "agentidentifiers", ""),
		},
		firstFlight{
			file:   "anp-0.36-agent-connect-token.h2",
			client: "upstream proxy-agent v0.36.0 (grpc-go 1.81.1) in token mode, --proxy-server-host=127.0.0.1 --proxy-server-port=8091",
			basis:  "pkg/agent/client.go Connect metadata + authorization; grpc-go authority = dial target host:port",
			fields: grpcRequest("https", agentPath, "127.0.0.1:8091", true, "grpc-go/1.81.1",
				"agentid", "agent-upstream-2", "agentidentifiers", "host=node-2&ipv4=127.0.0.1",
				"authorization", "Bearer conformance-token"),
		},
	)
	return out
}

func firstFlightsCmd(args []string) error {
	fs := flag.NewFlagSet("first-flights", flag.ExitOnError)
	out := fs.String("out", "", "directory to write the fixtures to")
	_ = fs.Parse(args)
	if *out == "" {
		return fmt.Errorf("first-flights: -out is required")
	}
	for _, ff := range firstFlights() {
		// grpc-go's connection: the preface, an empty SETTINGS (default window and header list
		// sizes set nothing); the transport is ready once the server's SETTINGS arrived, which
		// it acknowledges (the capture of grpc-go 1.33.3 shows this order), so the first stream
		// comes after that ACK: HEADERS with END_HEADERS only (the stream stays open for
		// messages), its block from a fresh HPACK encoder with the default 4096-byte table.
		var wire bytes.Buffer
		wire.WriteString(http2.ClientPreface)
		fr := http2.NewFramer(&wire, nil)
		if err := fr.WriteSettings(); err != nil {
			return err
		}
		if err := fr.WriteSettingsAck(); err != nil {
			return err
		}
		var block bytes.Buffer
		enc := hpack.NewEncoder(&block)
		streams := ff.streams
		if streams == 0 {
			streams = 1
		}
		for i := 0; i < streams; i++ {
			block.Reset()
			for _, h := range ff.fields {
				if err := enc.WriteField(h); err != nil {
					return err
				}
			}
			id := uint32(2*i + 1)
			if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: block.Bytes(), EndHeaders: true}); err != nil {
				return err
			}
		}
		f := newFixture(
			"client: "+ff.client,
			"header list: "+ff.basis,
			"source: encoded by the real encoder: golang.org/x/net/http2 Framer + http2/hpack Encoder",
			"        (Debian bookworm golang-golang-x-net-dev 0.7.0), tests/real-clients/goclient first-flights (regen.sh)",
			"`c` lines: the client's first flight (its SETTINGS ACK answers the server's SETTINGS);",
			"           the test runs each stream's tunnel (gRPC messages) right after its HEADERS",
		)
		var prefaceSeen bool
		us, rest := units(wire.Bytes(), true, &prefaceSeen)
		if len(rest) != 0 {
			return fmt.Errorf("%s: %d trailing bytes", ff.file, len(rest))
		}
		for _, u := range us {
			f.client(u)
		}
		if err := f.write(filepath.Join(*out, ff.file)); err != nil {
			return err
		}
	}
	return nil
}

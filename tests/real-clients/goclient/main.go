// Command goclient is Spoke's stand-in for kube-apiserver's konnectivity-client, built from the
// grpc-go that Debian bookworm ships (1.33.3) in GOPATH mode, so that Spoke's conformance tests
// can check a client Spoke did not write and record what such clients put on the wire.
//
//	goclient tunnel -socket PATH -address HOST:PORT   one single-use tunnel, as kube-apiserver
//	goclient capture -out FILE                        record the bytes of one tunnel
//	goclient first-flights -out DIR                   encode other clients' first flights
//
// Fixture format (read by tests/src/h2wire.rs): one line per unit the client wrote, `c <hex>`
// (the connection preface or one whole HTTP/2 frame); `#` lines are comments, written here to
// say what each unit is and, for captures, which server frames arrived in between.
package main

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"os"
	"strings"

	"github.com/golang/protobuf/proto"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

func main() {
	if len(os.Args) < 2 {
		fail("usage: goclient tunnel|capture|first-flights [flags]")
	}
	var err error
	switch os.Args[1] {
	case "tunnel":
		err = tunnelCmd(os.Args[2:])
	case "capture":
		err = captureCmd(os.Args[2:])
	case "first-flights":
		err = firstFlightsCmd(os.Args[2:])
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fail(err.Error())
	}
}

func fail(msg string) {
	fmt.Fprintln(os.Stderr, "goclient:", msg)
	os.Exit(1)
}

// fixture renders units and comments in the fixture format.
type fixture struct {
	b strings.Builder
	// HPACK decoders per direction (the dynamic table lives as long as the connection).
	dec map[byte]*hpack.Decoder
}

func newFixture(header ...string) *fixture {
	f := &fixture{dec: map[byte]*hpack.Decoder{}}
	for _, h := range header {
		f.comment("%s", h)
	}
	return f
}

func (f *fixture) comment(format string, args ...interface{}) {
	for _, line := range strings.Split(fmt.Sprintf(format, args...), "\n") {
		f.b.WriteString(strings.TrimRight("# "+line, " ") + "\n")
	}
}

// client records one unit the client wrote.
func (f *fixture) client(unit []byte) {
	f.comment("c: %s", f.describe('c', unit))
	f.b.WriteString("c " + hex.EncodeToString(unit) + "\n")
}

// server notes a frame the server wrote (not replayed).
func (f *fixture) server(frame []byte) {
	f.comment("s: %s", f.describe('s', frame))
}

func (f *fixture) write(path string) error {
	return os.WriteFile(path, []byte(f.b.String()), 0o644)
}

var frameNames = map[byte]string{0: "DATA", 1: "HEADERS", 2: "PRIORITY", 3: "RST_STREAM", 4: "SETTINGS",
	5: "PUSH_PROMISE", 6: "PING", 7: "GOAWAY", 8: "WINDOW_UPDATE", 9: "CONTINUATION"}

// describe explains a unit: frame type, flags, stream, and the decoded content where useful.
func (f *fixture) describe(dir byte, unit []byte) string {
	if bytes.Equal(unit, []byte(http2.ClientPreface)) {
		return "connection preface"
	}
	if len(unit) < 9 {
		return fmt.Sprintf("%d stray bytes", len(unit))
	}
	kind, flags := unit[3], unit[4]
	stream := binary.BigEndian.Uint32(unit[5:9]) & 0x7fffffff
	payload := unit[9:]
	name := frameNames[kind]
	if name == "" {
		name = fmt.Sprintf("type 0x%x", kind)
	}
	s := fmt.Sprintf("%s flags=0x%02x stream=%d length=%d", name, flags, stream, len(payload))
	switch kind {
	case 0x1:
		d := f.dec[dir]
		if d == nil {
			d = hpack.NewDecoder(4096, nil)
			f.dec[dir] = d
		}
		fields, err := d.DecodeFull(payload)
		if err != nil {
			return s + " (undecodable block: " + err.Error() + ")"
		}
		for _, h := range fields {
			s += fmt.Sprintf("\n    %s: %q", h.Name, h.Value)
		}
	case 0x0:
		for len(payload) >= 5 {
			n := int(binary.BigEndian.Uint32(payload[1:5]))
			if len(payload) < 5+n {
				break
			}
			var p Packet
			if err := proto.Unmarshal(payload[5:5+n], &p); err == nil {
				s += "\n    gRPC message: " + proto.CompactTextString(&p)
			}
			payload = payload[5+n:]
		}
	case 0x4:
		for i := 0; i+6 <= len(payload); i += 6 {
			s += fmt.Sprintf(" [0x%x=%d]", binary.BigEndian.Uint16(payload[i:]), binary.BigEndian.Uint32(payload[i+2:]))
		}
	}
	return s
}

// units splits what one side wrote into the preface (client side only) and whole frames; the
// rest is an incomplete frame still to come.
func units(buf []byte, client bool, prefaceSeen *bool) (out [][]byte, rest []byte) {
	if client && !*prefaceSeen {
		if len(buf) < len(http2.ClientPreface) {
			return nil, buf
		}
		out = append(out, buf[:len(http2.ClientPreface)])
		buf = buf[len(http2.ClientPreface):]
		*prefaceSeen = true
	}
	for len(buf) >= 9 {
		n := 9 + (int(buf[0])<<16 | int(buf[1])<<8 | int(buf[2]))
		if len(buf) < n {
			break
		}
		out = append(out, buf[:n])
		buf = buf[n:]
	}
	return out, buf
}

func protoText(p *Packet) string { return proto.CompactTextString(p) }

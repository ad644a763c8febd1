package main

import (
	"flag"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"google.golang.org/grpc"
)

// captureCmd records one tunnel of the real client: client → recording Unix-socket relay →
// a grpc-go 1.33.3 server standing in for upstream's proxy-server + agent + echo endpoint.
// The stand-in is Go's own HTTP/2 stack, which (like upstream's server) accepts a socket path as
// :authority, so the exchange completes and every byte the client sends is on record.
func captureCmd(args []string) error {
	fs := flag.NewFlagSet("capture", flag.ExitOnError)
	out := fs.String("out", "", "fixture file to write")
	target := fs.String("target", "/etc/kubernetes/konnectivity-server/konnectivity-server.socket",
		"gRPC dial target (kube-apiserver: the socket path from its EgressSelectorConfiguration)")
	address := fs.String("address", "127.0.0.1:10250", "address in DIAL_REQ (the stand-in does not dial it)")
	message := fs.String("message", "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:10250\r\n\r\n", "DATA sent through the tunnel")
	tunnels := fs.Int("tunnels", 1, "tunnels over one connection (see tunnel -tunnels)")
	_ = fs.Parse(args)
	if *out == "" {
		return fmt.Errorf("capture: -out is required")
	}
	dir, err := os.MkdirTemp("", "goclient-capture")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	serverSock, relaySock := filepath.Join(dir, "server.sock"), filepath.Join(dir, "relay.sock")

	sl, err := net.Listen("unix", serverSock)
	if err != nil {
		return err
	}
	srv := grpc.NewServer()
	RegisterProxyServiceServer(srv, standIn{})
	go func() { _ = srv.Serve(sl) }()
	defer srv.Stop()

	rl, err := net.Listen("unix", relaySock)
	if err != nil {
		return err
	}
	rec := &recording{}
	relayed := make(chan error, 1)
	go func() { relayed <- rec.relayOne(rl, serverSock) }()

	if err := tunnel(*target, relaySock, *address, []byte(*message), *tunnels); err != nil {
		return fmt.Errorf("the real client's tunnel through the stand-in failed: %w", err)
	}
	select {
	case err := <-relayed:
		if err != nil {
			return err
		}
	case <-time.After(10 * time.Second):
		return fmt.Errorf("relay did not see both sides close within 10 s")
	}

	f := newFixture(
		"client: grpc-go 1.33.3 (Debian bookworm golang-google-grpc-dev 1.33.3-2, x/net 0.7.0, golang/protobuf 1.3.5)",
		"source: captured from a real run: tests/real-clients/goclient capture (regen.sh)",
		"what: konnectivity-client's calls as kube-apiserver makes them (proxyProtocol: GRPC over a Unix socket):",
		fmt.Sprintf("      target %s, custom Unix dialer, blocking dial, plaintext; %d tunnel(s) on this connection", *target, *tunnels),
		"peer: a grpc-go 1.33.3 server standing in for proxy-server + agent + endpoint (it accepted this :authority)",
		"`c` lines: every unit the client wrote, in order; `# s:` notes: server frames that arrived in between",
	)
	rec.render(f)
	return f.write(*out)
}

// standIn answers like upstream's server with an agent and an echo endpoint behind it.
type standIn struct{}

func (standIn) Proxy(stream ProxyService_ProxyServer) error {
	for {
		p, err := stream.Recv()
		if err != nil {
			return nil
		}
		var reply *Packet
		switch p.Type {
		case PacketType_DIAL_REQ:
			reply = &Packet{Type: PacketType_DIAL_RSP, Payload: &Packet_DialResponse{DialResponse: &DialResponse{
				Random: p.GetDialRequest().GetRandom(), ConnectID: 1}}}
		case PacketType_DATA:
			reply = &Packet{Type: PacketType_DATA, Payload: &Packet_Data{Data: &Data{
				ConnectID: p.GetData().GetConnectID(), Data: p.GetData().GetData()}}}
		case PacketType_CLOSE_REQ:
			reply = &Packet{Type: PacketType_CLOSE_RSP, Payload: &Packet_CloseResponse{CloseResponse: &CloseResponse{
				ConnectID: p.GetCloseRequest().GetConnectID()}}}
		}
		if reply != nil {
			if err := stream.Send(reply); err != nil {
				return err
			}
		}
	}
}

type chunk struct {
	fromClient bool
	data       []byte
}

// recording holds what crossed the relay, in arrival order.
type recording struct {
	mu     sync.Mutex
	chunks []chunk
}

func (r *recording) add(fromClient bool, b []byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.chunks = append(r.chunks, chunk{fromClient, append([]byte(nil), b...)})
}

// relayOne accepts one connection on l and relays it to upstream until both sides are done.
func (r *recording) relayOne(l net.Listener, upstream string) error {
	defer l.Close()
	c, err := l.Accept()
	if err != nil {
		return err
	}
	defer c.Close()
	s, err := net.Dial("unix", upstream)
	if err != nil {
		return err
	}
	defer s.Close()
	var wg sync.WaitGroup
	pump := func(dst, src net.Conn, fromClient bool) {
		defer wg.Done()
		buf := make([]byte, 64*1024)
		for {
			n, err := src.Read(buf)
			if n > 0 {
				r.add(fromClient, buf[:n])
				if _, werr := dst.Write(buf[:n]); werr != nil {
					break
				}
			}
			if err != nil {
				break // EOF or a reset at the end is part of the run, not a capture failure
			}
		}
		// Whichever side ends, end both: the run is over.
		c.Close()
		s.Close()
	}
	wg.Add(2)
	go pump(s, c, true)
	go pump(c, s, false)
	wg.Wait()
	return nil
}

// render writes the client's units and notes the server's frames, each side split into whole
// units in the order their last byte arrived.
func (r *recording) render(f *fixture) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var cbuf, sbuf []byte
	prefaceSeen, noPreface := false, true
	for _, ch := range r.chunks {
		if ch.fromClient {
			var us [][]byte
			us, cbuf = units(append(cbuf, ch.data...), true, &prefaceSeen)
			for _, u := range us {
				f.client(u)
			}
		} else {
			var us [][]byte
			us, sbuf = units(append(sbuf, ch.data...), false, &noPreface)
			for _, u := range us {
				f.server(u)
			}
		}
	}
	if len(cbuf) > 0 {
		f.comment("client left %d bytes of an incomplete frame", len(cbuf))
	}
}

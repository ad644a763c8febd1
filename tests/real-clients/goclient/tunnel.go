package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"math/rand"
	"net"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
)

// tunnelCmd runs one single-use tunnel the way kube-apiserver's egress dialer drives
// konnectivity-client with `proxyProtocol: GRPC` over a Unix socket, then prints "ok".
func tunnelCmd(args []string) error {
	fs := flag.NewFlagSet("tunnel", flag.ExitOnError)
	socket := fs.String("socket", "", "Unix socket of the proxy server's gRPC frontend")
	target := fs.String("target", "", "gRPC dial target (default: the socket path, as kube-apiserver does)")
	address := fs.String("address", "", "host:port to dial through the tunnel (an echo server)")
	message := fs.String("message", "spoke conformance: grpc-go 1.33.3 through the tunnel", "bytes to send and expect back")
	tunnels := fs.Int("tunnels", 1, "tunnels, one after the other; more than 1 share one connection, a Proxy stream each (konnectivity-client master's CreateGRPCTunnel)")
	tlsAddr := fs.String("tls", "", "host:port of the proxy server's mTLS gRPC frontend, instead of -socket (Go's crypto/tls, TLS 1.3)")
	ca := fs.String("ca", "", "with -tls: CA certificate PEM the server's certificate must chain to")
	cert := fs.String("cert", "", "with -tls: client certificate PEM")
	key := fs.String("key", "", "with -tls: client key PEM")
	size := fs.Int("size", 0, "send this many bytes (a pattern, one DATA packet) instead of -message")
	_ = fs.Parse(args)
	if (*socket == "") == (*tlsAddr == "") || *address == "" {
		return fmt.Errorf("tunnel: -address and one of -socket or -tls are required")
	}
	msg := []byte(*message)
	if *size > 0 {
		msg = make([]byte, *size)
		for i := range msg {
			msg[i] = byte(i*31) ^ byte(i>>8)
		}
	}
	var err error
	if *tlsAddr != "" {
		err = tunnelTLS(*tlsAddr, *ca, *cert, *key, *address, msg, *tunnels)
	} else {
		if *target == "" {
			*target = *socket
		}
		err = tunnel(*target, *socket, *address, msg, *tunnels)
	}
	if err != nil {
		return err
	}
	fmt.Println("ok")
	return nil
}

// tunnel dials target with a dialer that opens socket (kube-apiserver passes the socket path as
// the target and dials the path itself), blocking, 30 s dial timeout, plaintext; then one Proxy
// stream per tunnel: DIAL_REQ, wait DIAL_RSP, DATA, read the echo, CLOSE_REQ, wait CLOSE_RSP;
// then close. A single-use tunnel (konnectivity-client's CreateSingleUseGrpcTunnel) leaves its
// stream to the connection's close; reused connections cancel each stream's context after its
// tunnel, as CreateGRPCTunnel does.
func tunnel(target, socket, address string, msg []byte, tunnels int) error {
	dialer := func(ctx context.Context, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", socket)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// grpc-go 1.33 has no credentials/insecure; WithInsecure is the same plaintext transport.
	cc, err := grpc.DialContext(ctx, target, grpc.WithContextDialer(dialer), grpc.WithBlock(),
		grpc.WithReturnConnectionError(), grpc.WithInsecure())
	if err != nil {
		return fmt.Errorf("dial %s: %w", target, err)
	}
	defer cc.Close()

	return proxyTunnels(cc, address, msg, tunnels)
}

// tunnelTLS is tunnel over mTLS TCP, as kube-apiserver's GRPC egress with a `tcp` transport
// and a TLS config: Go's crypto/tls with the client certificate, the server name localhost.
func tunnelTLS(addr, ca, cert, key, address string, msg []byte, tunnels int) error {
	pair, err := tls.LoadX509KeyPair(cert, key)
	if err != nil {
		return fmt.Errorf("client certificate: %w", err)
	}
	pem, err := os.ReadFile(ca)
	if err != nil {
		return fmt.Errorf("CA: %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return fmt.Errorf("CA %s: no certificate", ca)
	}
	creds := credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{pair}, RootCAs: roots, ServerName: "localhost"})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cc, err := grpc.DialContext(ctx, addr, grpc.WithTransportCredentials(creds), grpc.WithBlock(),
		grpc.WithReturnConnectionError())
	if err != nil {
		return fmt.Errorf("dial %s: %w", addr, err)
	}
	defer cc.Close()
	return proxyTunnels(cc, address, msg, tunnels)
}

func proxyTunnels(cc *grpc.ClientConn, address string, msg []byte, tunnels int) error {
	proxy := NewProxyServiceClient(cc)
	if tunnels == 1 {
		// The stream's context has no deadline (kube-apiserver uses context.Background()), so
		// no grpc-timeout header goes out; the waits have their own timeouts.
		return proxyTunnel(context.Background(), proxy, address, msg)
	}
	for i := 0; i < tunnels; i++ {
		ctx, cancel := context.WithCancel(context.Background())
		err := proxyTunnel(ctx, proxy, address, msg)
		cancel()
		if err != nil {
			return fmt.Errorf("tunnel %d of %d: %w", i+1, tunnels, err)
		}
	}
	return nil
}

func proxyTunnel(ctx context.Context, proxy ProxyServiceClient, address string, msg []byte) error {
	stream, err := proxy.Proxy(ctx)
	if err != nil {
		return fmt.Errorf("Proxy: %w", err)
	}
	packets := make(chan *Packet, 16)
	recvErr := make(chan error, 1)
	go func() {
		for {
			p, err := stream.Recv()
			if err != nil {
				recvErr <- err
				return
			}
			packets <- p
		}
	}()
	next := func(want PacketType, timeout time.Duration) (*Packet, error) {
		deadline := time.After(timeout)
		for {
			select {
			case p := <-packets:
				if p.Type == want {
					return p, nil
				}
				return nil, fmt.Errorf("expected %v, got %v", want, protoText(p))
			case err := <-recvErr:
				return nil, fmt.Errorf("tunnel closed while waiting for %v: %w", want, err)
			case <-deadline:
				return nil, fmt.Errorf("no %v within %v", want, timeout)
			}
		}
	}

	random := rand.New(rand.NewSource(time.Now().UnixNano())).Int63()
	if err := stream.Send(&Packet{Type: PacketType_DIAL_REQ, Payload: &Packet_DialRequest{DialRequest: &DialRequest{
		Protocol: "tcp", Address: address, Random: random}}}); err != nil {
		return fmt.Errorf("send DIAL_REQ: %w", err)
	}
	p, err := next(PacketType_DIAL_RSP, 30*time.Second)
	if err != nil {
		return err
	}
	rsp := p.GetDialResponse()
	if rsp.GetError() != "" || rsp.GetRandom() != random || rsp.GetConnectID() == 0 {
		return fmt.Errorf("dial failed: %v", protoText(p))
	}
	id := rsp.GetConnectID()
	if err := stream.Send(&Packet{Type: PacketType_DATA, Payload: &Packet_Data{Data: &Data{ConnectID: id, Data: msg}}}); err != nil {
		return fmt.Errorf("send DATA: %w", err)
	}
	var got []byte
	for len(got) < len(msg) {
		p, err := next(PacketType_DATA, 10*time.Second)
		if err != nil {
			return fmt.Errorf("after %d of %d echoed bytes: %w", len(got), len(msg), err)
		}
		got = append(got, p.GetData().GetData()...)
	}
	if !bytes.Equal(got, msg) {
		return fmt.Errorf("echo returned %q, sent %q", got, msg)
	}
	if err := stream.Send(&Packet{Type: PacketType_CLOSE_REQ, Payload: &Packet_CloseRequest{CloseRequest: &CloseRequest{ConnectID: id}}}); err != nil {
		return fmt.Errorf("send CLOSE_REQ: %w", err)
	}
	// konnectivity-client's CloseTimeout.
	p, err = next(PacketType_CLOSE_RSP, 10*time.Second)
	if err != nil {
		return err
	}
	if e := p.GetCloseResponse().GetError(); e != "" {
		return fmt.Errorf("CLOSE_RSP error: %s", e)
	}
	return nil
}

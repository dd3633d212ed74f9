// Command kubeletclient calls a device plugin the way the kubelet's device manager does and
// prints how long each call took.
//
// It dials the plugin's unix socket (insecure, authority "localhost", blocking dial), opens the
// ListAndWatch stream and keeps it open, takes the healthy device IDs from the first list, and
// then, for each simulated container, calls GetPreferredAllocation and Allocate with the
// preferred IDs and no deadline, as the kubelet does at pod admission. It also times the empty
// GetDevicePluginOptions RPC on the same connection: the gRPC round trip with no work in it.
//
// Output: one JSON object on stdout with the samples in milliseconds.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	api "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
)

type result struct {
	Socket    string    `json:"socket"`
	Devices   int       `json:"devices"`
	Size      int       `json:"size"`
	Preferred []float64 `json:"preferred_ms"`
	Allocate  []float64 `json:"allocate_ms"`
	Empty     []float64 `json:"empty_ms"`
}

func dial(ctx context.Context, socket string, timeout time.Duration) (*grpc.ClientConn, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	// DialContext and WithBlock are deprecated, and still what the kubelet dials with.
	return grpc.DialContext(ctx, socket,
		grpc.WithAuthority("localhost"),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithBlock(),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", addr)
		}),
	)
}

func ms(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e6 }

func healthyIDs(list *api.ListAndWatchResponse) []string {
	var ids []string
	for _, d := range list.Devices {
		if d.Health == api.Healthy {
			ids = append(ids, d.ID)
		}
	}
	return ids
}

// admit runs one container's admission: GetPreferredAllocation, then Allocate with the answer.
func admit(client api.DevicePluginClient, available []string, size int) (time.Duration, time.Duration, error) {
	t0 := time.Now()
	pref, err := client.GetPreferredAllocation(context.Background(), &api.PreferredAllocationRequest{
		ContainerRequests: []*api.ContainerPreferredAllocationRequest{{
			AvailableDeviceIDs:   available,
			MustIncludeDeviceIDs: []string{},
			AllocationSize:       int32(size),
		}},
	})
	t1 := time.Now()
	if err != nil {
		return 0, 0, fmt.Errorf("GetPreferredAllocation: %w", err)
	}
	if len(pref.ContainerResponses) != 1 || len(pref.ContainerResponses[0].DeviceIDs) != size {
		return 0, 0, fmt.Errorf("GetPreferredAllocation answered %v for size %d", pref.ContainerResponses, size)
	}
	ids := pref.ContainerResponses[0].DeviceIDs
	t2 := time.Now()
	resp, err := client.Allocate(context.Background(), &api.AllocateRequest{
		ContainerRequests: []*api.ContainerAllocateRequest{{DevicesIds: ids}},
	})
	t3 := time.Now()
	if err != nil {
		return 0, 0, fmt.Errorf("Allocate %v: %w", ids, err)
	}
	if len(resp.ContainerResponses) != 1 {
		return 0, 0, fmt.Errorf("Allocate answered %d container responses for 1", len(resp.ContainerResponses))
	}
	return t1.Sub(t0), t3.Sub(t2), nil
}

func run(socket string, calls, warmup, size int, dialTimeout time.Duration) (*result, error) {
	conn, err := dial(context.Background(), socket, dialTimeout)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", socket, err)
	}
	defer conn.Close()
	client := api.NewDevicePluginClient(conn)

	opts, err := client.GetDevicePluginOptions(context.Background(), &api.Empty{})
	if err != nil {
		return nil, fmt.Errorf("GetDevicePluginOptions: %w", err)
	}
	if !opts.GetPreferredAllocationAvailable {
		return nil, errors.New("the plugin does not offer GetPreferredAllocation")
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stream, err := client.ListAndWatch(ctx, &api.Empty{})
	if err != nil {
		return nil, fmt.Errorf("ListAndWatch: %w", err)
	}
	first, err := stream.Recv()
	if err != nil {
		return nil, fmt.Errorf("ListAndWatch: %w", err)
	}
	available := healthyIDs(first)
	if len(available) < size {
		return nil, fmt.Errorf("%d healthy devices, fewer than the size %d", len(available), size)
	}
	// Keep reading the stream, as the kubelet does, so later lists do not queue up.
	go func() {
		for {
			if _, err := stream.Recv(); err != nil {
				return
			}
		}
	}()

	res := &result{Socket: socket, Devices: len(available), Size: size}
	for i := 0; i < warmup+calls; i++ {
		pref, alloc, err := admit(client, available, size)
		if err != nil {
			return nil, err
		}
		if i >= warmup {
			res.Preferred = append(res.Preferred, ms(pref))
			res.Allocate = append(res.Allocate, ms(alloc))
		}
	}
	for i := 0; i < warmup+calls; i++ {
		t0 := time.Now()
		if _, err := client.GetDevicePluginOptions(context.Background(), &api.Empty{}); err != nil {
			return nil, fmt.Errorf("GetDevicePluginOptions: %w", err)
		}
		if i >= warmup {
			res.Empty = append(res.Empty, ms(time.Since(t0)))
		}
	}
	return res, nil
}

func main() {
	socket := flag.String("socket", "", "the plugin's unix socket (required)")
	calls := flag.Int("calls", 2000, "timed admissions (and as many empty RPCs)")
	warmup := flag.Int("warmup", 200, "untimed calls first")
	size := flag.Int("size", 1, "devices per container")
	dialTimeout := flag.Duration("dial-timeout", 10*time.Second, "how long to wait for the plugin's socket to answer")
	flag.Parse()
	if *socket == "" || *calls < 1 || *calls > 1_000_000 || *warmup < 0 || *warmup > 1_000_000 || *size < 1 || *dialTimeout <= 0 {
		fmt.Fprintln(os.Stderr, "kubeletclient: -socket is required; 1 <= -calls <= 1000000, 0 <= -warmup <= 1000000, -size >= 1, -dial-timeout > 0")
		os.Exit(2)
	}
	res, err := run(*socket, *calls, *warmup, *size, *dialTimeout)
	if err != nil {
		fmt.Fprintln(os.Stderr, "kubeletclient:", err)
		os.Exit(1)
	}
	if err := json.NewEncoder(os.Stdout).Encode(res); err != nil {
		fmt.Fprintln(os.Stderr, "kubeletclient:", err)
		os.Exit(1)
	}
}

// Command baseline is a minimal device plugin, the yardstick for gpushare's per-call cost: it
// serves the v1beta1 DevicePlugin API on a unix socket with N healthy devices, prefers the
// first IDs offered, and answers Allocate with one environment variable naming the IDs. It does
// not register with a kubelet; a client dials its socket directly.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	api "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
)

type plugin struct {
	api.UnimplementedDevicePluginServer
	devices []*api.Device
	known   map[string]bool
}

func newPlugin(gpus, replicas int) *plugin {
	p := &plugin{known: map[string]bool{}}
	for g := 0; g < gpus; g++ {
		for r := 0; r < replicas; r++ {
			id := fmt.Sprintf("GPU-%08x-0000-0000-0000-%012x::%d", g, g, r)
			p.devices = append(p.devices, &api.Device{ID: id, Health: api.Healthy})
			p.known[id] = true
		}
	}
	return p
}

func (p *plugin) GetDevicePluginOptions(context.Context, *api.Empty) (*api.DevicePluginOptions, error) {
	return &api.DevicePluginOptions{GetPreferredAllocationAvailable: true}, nil
}

func (p *plugin) ListAndWatch(_ *api.Empty, stream grpc.ServerStreamingServer[api.ListAndWatchResponse]) error {
	if err := stream.Send(&api.ListAndWatchResponse{Devices: p.devices}); err != nil {
		return err
	}
	<-stream.Context().Done()
	return nil
}

func (p *plugin) GetPreferredAllocation(_ context.Context, req *api.PreferredAllocationRequest) (*api.PreferredAllocationResponse, error) {
	resp := &api.PreferredAllocationResponse{}
	for _, c := range req.ContainerRequests {
		chosen := append([]string{}, c.MustIncludeDeviceIDs...)
		taken := map[string]bool{}
		for _, id := range chosen {
			taken[id] = true
		}
		for _, id := range c.AvailableDeviceIDs {
			if len(chosen) >= int(c.AllocationSize) {
				break
			}
			if !taken[id] {
				chosen = append(chosen, id)
			}
		}
		resp.ContainerResponses = append(resp.ContainerResponses,
			&api.ContainerPreferredAllocationResponse{DeviceIDs: chosen})
	}
	return resp, nil
}

func (p *plugin) Allocate(_ context.Context, req *api.AllocateRequest) (*api.AllocateResponse, error) {
	if len(req.ContainerRequests) == 0 {
		return nil, status.Error(codes.InvalidArgument, "no container requests")
	}
	resp := &api.AllocateResponse{}
	for _, c := range req.ContainerRequests {
		for _, id := range c.DevicesIds {
			if !p.known[id] {
				return nil, status.Errorf(codes.InvalidArgument, "unknown device %q", id)
			}
		}
		resp.ContainerResponses = append(resp.ContainerResponses, &api.ContainerAllocateResponse{
			Envs: map[string]string{"NVIDIA_VISIBLE_DEVICES": strings.Join(c.DevicesIds, ",")},
		})
	}
	return resp, nil
}

func (p *plugin) PreStartContainer(context.Context, *api.PreStartContainerRequest) (*api.PreStartContainerResponse, error) {
	return &api.PreStartContainerResponse{}, nil
}

func main() {
	socket := flag.String("socket", "", "unix socket to serve on (required; a stale one is removed)")
	gpus := flag.Int("gpus", 8, "GPUs")
	replicas := flag.Int("replicas", 8, "device IDs per GPU")
	flag.Parse()
	if *socket == "" || *gpus < 1 || *replicas < 1 || *gpus**replicas > 100_000 {
		fmt.Fprintln(os.Stderr, "baseline: -socket is required; 1 <= -gpus x -replicas <= 100000")
		os.Exit(2)
	}
	_ = os.Remove(*socket)
	lis, err := net.Listen("unix", *socket)
	if err != nil {
		fmt.Fprintln(os.Stderr, "baseline:", err)
		os.Exit(1)
	}
	if err := os.Chmod(*socket, 0o600); err != nil {
		fmt.Fprintln(os.Stderr, "baseline:", err)
		os.Exit(1)
	}
	server := grpc.NewServer()
	api.RegisterDevicePluginServer(server, newPlugin(*gpus, *replicas))
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-stop
		server.Stop()
	}()
	if err := server.Serve(lis); err != nil {
		fmt.Fprintln(os.Stderr, "baseline:", err)
		os.Exit(1)
	}
}

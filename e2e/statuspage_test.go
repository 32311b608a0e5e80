package e2e

import (
	"bytes"
	"image/png"
	"io"
	"log/slog"
	"net"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/vpcreach/vpcreach/internal/agent"
	"github.com/vpcreach/vpcreach/internal/statuspage"
	"github.com/vpcreach/vpcreach/internal/statuspage/browsertest"
	"github.com/vpcreach/vpcreach/internal/testutil"
	"github.com/vpcreach/vpcreach/registry"
)

// TestStatusPageInBrowser loads a live proxy server's status page in a
// real headless Chromium: the route, its agent, the traffic it carried
// and a real warning appear, the agent id's markup shows as text, and a
// screenshot renders.
func TestStatusPageInBrowser(t *testing.T) {
	testutil.NeedBinary(t, "chromium")
	rec := statuspage.NewRecent(testutil.Logger(t).Handler(), 50) // as the proxyserver's main wires it
	reg := registry.NewMemory(nil)
	srv := startServer(t, reg, slog.New(rec))
	target := testutil.EchoTarget(t)
	const agentID = "ui-agent-<b>1</b>"
	startAgent(t, []string{srv.ControlAddr().String()}, []string{target}, nil, func(c *agent.Config, _ *agent.Agent) {
		if c != nil {
			c.AgentID = agentID
		}
	})
	route := waitRoute(t, reg, target, "")

	// Traffic through the proxy port.
	c, err := net.DialTimeout("tcp", route.Proxy.String(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	msg := []byte("hello through the tunnel")
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, make([]byte, len(msg))); err != nil {
		t.Fatal(err)
	}
	c.Close()
	testutil.Eventually(t, 10*time.Second, "bytes counted", func() bool {
		m := scrape(t, srv.APIAddr())
		return m[`vpcreach_server_bytes_total{direction="to_target"}`] >= float64(len(msg)) &&
			m[`vpcreach_server_bytes_total{direction="from_target"}`] >= float64(len(msg))
	})

	// A real warning: something that is not an agent on the control port.
	junk, err := net.DialTimeout("tcp", srv.ControlAddr().String(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	_ = junk.SetDeadline(time.Now().Add(10 * time.Second))
	_, _ = io.WriteString(junk, "GET / HTTP/1.0\r\n\r\n")
	_, _ = io.Copy(io.Discard, junk) // the server closes it
	junk.Close()
	testutil.Eventually(t, 10*time.Second, "warning kept", func() bool { return rec.Total() > 0 })

	url := "http://" + srv.APIAddr().String() + "/"
	dom := browsertest.DumpDOM(t, url)
	if !regexp.MustCompile(`data-refreshes="[1-9]`).MatchString(dom) {
		t.Fatalf("the page's script did not complete a refresh:\n%s", dom)
	}
	for _, want := range []string{
		route.Key.String(),              // the four-tuple: target ...
		route.Proxy.String(),            // ... and proxy address
		route.Relay.String(),            // the member's relay port
		route.Server,                    // this member's id
		"ui-agent-&lt;b&gt;1&lt;/b&gt;", // the agent id, as text
		route.Session,
		"this member",
		"tunnel handshake failed",   // the warning, from the Recent handler
		`<div class="v">24 B</div>`, // bytes each way
	} {
		if !strings.Contains(dom, want) {
			t.Errorf("DOM lacks %q", want)
		}
	}
	if strings.Contains(dom, "<b>1</b>") {
		t.Error("the agent id's markup was parsed")
	}
	if t.Failed() {
		t.Logf("DOM:\n%s", dom)
	}

	p := browsertest.Screenshot(t, url, 1280, 900)
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	img, err := png.Decode(bytes.NewReader(b))
	if err != nil {
		t.Fatalf("screenshot: %v", err)
	}
	colours := map[[4]uint32]bool{}
	bounds := img.Bounds()
	for y := bounds.Min.Y; y < bounds.Max.Y; y += 3 {
		for x := bounds.Min.X; x < bounds.Max.X; x += 3 {
			r, g, bl, a := img.At(x, y).RGBA()
			colours[[4]uint32{r, g, bl, a}] = true
		}
	}
	t.Logf("screenshot: %d bytes, %dx%d, %d colours sampled", len(b), bounds.Dx(), bounds.Dy(), len(colours))
	if len(b) < 20<<10 || bounds.Dx() != 1280 || bounds.Dy() != 900 || len(colours) < 16 {
		t.Errorf("screenshot looks empty: %d bytes, %v, %d colours", len(b), bounds, len(colours))
	}
}

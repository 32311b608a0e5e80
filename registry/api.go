package registry

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// The lookup API, served by every proxy server (JSON over HTTP):
//
//	GET /v1/routes                      -> [Route, ...]
//	GET /v1/lookup?target=[net/]ip:port -> Route, or 404 {"error": "..."}
//
// NewHandler serves it from any Reader; NewAPIClient reads it.

// NewHandler returns the lookup API handler over r. The caller mounts it
// (paths start with /v1/) and may add its own endpoints.
func NewHandler(r Reader) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/routes", func(w http.ResponseWriter, req *http.Request) {
		routes, err := r.List(req.Context())
		if err != nil {
			WriteJSONError(w, http.StatusServiceUnavailable, err)
			return
		}
		WriteJSON(w, http.StatusOK, routes)
	})
	mux.HandleFunc("GET /v1/lookup", func(w http.ResponseWriter, req *http.Request) {
		k, err := ParseKey(req.URL.Query().Get("target"))
		if err != nil {
			WriteJSONError(w, http.StatusBadRequest, err)
			return
		}
		route, err := r.Lookup(req.Context(), k)
		switch {
		case errors.Is(err, ErrNotFound):
			WriteJSONError(w, http.StatusNotFound, err)
		case err != nil:
			WriteJSONError(w, http.StatusServiceUnavailable, err)
		default:
			WriteJSON(w, http.StatusOK, route)
		}
	})
	return mux
}

// WriteJSON writes v as a JSON response.
func WriteJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

// WriteJSONError writes {"error": err} with code.
func WriteJSONError(w http.ResponseWriter, code int, err error) {
	WriteJSON(w, code, map[string]string{"error": err.Error()})
}

// APIClient is a Reader over a proxy server's lookup API: the way a
// standalone socks5d (or any program) finds routes when the cluster runs
// on the in-memory registry.
type APIClient struct {
	base   string
	client *http.Client
}

// NewAPIClient returns a client for the lookup API at base (e.g.
// "http://10.0.0.2:7070"). A nil client uses one with a 2 s timeout.
func NewAPIClient(base string, client *http.Client) *APIClient {
	if client == nil {
		client = &http.Client{Timeout: 2 * time.Second}
	}
	return &APIClient{base: base, client: client}
}

func (c *APIClient) get(ctx context.Context, path string, v any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.base+path, nil)
	if err != nil {
		return err
	}
	resp, err := c.client.Do(req)
	if err != nil {
		return fmt.Errorf("registry: lookup API: %w", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return fmt.Errorf("registry: lookup API: %w", err)
	}
	switch resp.StatusCode {
	case http.StatusOK:
		return json.Unmarshal(body, v)
	case http.StatusNotFound:
		if strings.HasPrefix(resp.Header.Get("Content-Type"), "application/json") {
			return ErrNotFound
		}
		return fmt.Errorf("registry: lookup API: %s at %s (is this a vpcreach lookup API?)", resp.Status, c.base+path)
	default:
		return fmt.Errorf("registry: lookup API: %s: %s", resp.Status, body)
	}
}

func (c *APIClient) Lookup(ctx context.Context, k Key) (Route, error) {
	var r Route
	err := c.get(ctx, "/v1/lookup?target="+url.QueryEscape(k.String()), &r)
	return r, err
}

func (c *APIClient) List(ctx context.Context) ([]Route, error) {
	var rs []Route
	err := c.get(ctx, "/v1/routes", &rs)
	return rs, err
}

// Package config loads the YAML configuration files of the vpcreach
// binaries: strict decoding (an unknown key is an error that names it),
// secrets from a file or the environment, and the shared log settings.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"regexp"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// Validator is a config that can check itself after defaults are filled.
type Validator interface {
	Validate() error
}

// Load reads the YAML file at path into v strictly (unknown keys are
// errors) and then calls v.Validate.
func Load(path string, v Validator) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("config: %w", err)
	}
	return Parse(data, v)
}

// Parse decodes YAML text into v strictly and validates it. Decoding
// errors name the key as well as the line.
func Parse(data []byte, v Validator) error {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(v); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("config: %s", nameKeys(data, err.Error()))
	}
	if err := v.Validate(); err != nil {
		return fmt.Errorf("config: %w", err)
	}
	return nil
}

// Problems collects validation errors so that Validate reports all of them.
type Problems []string

// Addf records a problem about key.
func (p *Problems) Addf(key, format string, args ...any) {
	*p = append(*p, key+": "+fmt.Sprintf(format, args...))
}

// Duration fills *d with def when it is zero and records a problem about
// key when it is negative.
func (p *Problems) Duration(d *time.Duration, def time.Duration, key string) {
	if *d == 0 {
		*d = def
	} else if *d < 0 {
		p.Addf(key, "must be positive")
	}
}

// Err returns nil or one error listing every problem.
func (p Problems) Err() error {
	if len(p) == 0 {
		return nil
	}
	return errors.New(strings.Join(p, "; "))
}

// Secret names where a secret (a token) comes from: a file or an
// environment variable, never the config file itself or a flag.
type Secret struct {
	File string `yaml:"file"`
	Env  string `yaml:"env"`
}

// IsSet reports whether a source is configured.
func (s Secret) IsSet() bool { return s.File != "" || s.Env != "" }

// MinSecretLen is the shortest token accepted.
const MinSecretLen = 16

// Read returns the secret, trimmed of surrounding white space; a token
// shorter than MinSecretLen is an error.
func (s Secret) Read() (string, error) {
	v, err := s.ReadAny()
	if err != nil {
		return "", err
	}
	if len(v) < MinSecretLen {
		return "", fmt.Errorf("token is shorter than %d characters", MinSecretLen)
	}
	return v, nil
}

// ReadAny returns the secret, trimmed of surrounding white space, whatever
// its length (a password another system chose).
func (s Secret) ReadAny() (string, error) {
	var v string
	switch {
	case s.File != "" && s.Env != "":
		return "", errors.New("set file or env, not both")
	case s.File != "":
		b, err := os.ReadFile(s.File)
		if err != nil {
			return "", err
		}
		v = string(b)
	case s.Env != "":
		var ok bool
		if v, ok = os.LookupEnv(s.Env); !ok {
			return "", fmt.Errorf("environment variable %s is not set", s.Env)
		}
	default:
		return "", errors.New("no file or env given")
	}
	return strings.TrimSpace(v), nil
}

// Log configures logging.
type Log struct {
	Level  string `yaml:"level"`  // debug, info (default), warn, error
	Format string `yaml:"format"` // text (default) or json
}

// Validate checks the log settings.
func (l Log) Validate(p *Problems) {
	switch strings.ToLower(l.Level) {
	case "", "debug", "info", "warn", "error":
	default:
		p.Addf("log.level", "%q is not debug, info, warn or error", l.Level)
	}
	switch l.Format {
	case "", "text", "json":
	default:
		p.Addf("log.format", "%q is not text or json", l.Format)
	}
}

// Logger returns a logger writing to w.
func (l Log) Logger(w io.Writer) *slog.Logger {
	var level slog.Level
	_ = level.UnmarshalText([]byte(strings.ToUpper(orDefault(l.Level, "info"))))
	opts := &slog.HandlerOptions{Level: level}
	if l.Format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

func orDefault(s, d string) string {
	if s == "" {
		return d
	}
	return s
}

var lineRef = regexp.MustCompile(`line (\d+):`)

// nameKeys rewrites "line N:" in a YAML error as "line N (key.path):".
func nameKeys(data []byte, msg string) string {
	var root yaml.Node
	if yaml.Unmarshal(data, &root) != nil {
		return msg
	}
	keys := map[int]string{}
	var walk func(n *yaml.Node, prefix string)
	walk = func(n *yaml.Node, prefix string) {
		switch n.Kind {
		case yaml.DocumentNode, yaml.SequenceNode:
			for _, c := range n.Content {
				walk(c, prefix)
			}
		case yaml.MappingNode:
			for i := 0; i+1 < len(n.Content); i += 2 {
				k := prefix + n.Content[i].Value
				if _, seen := keys[n.Content[i].Line]; !seen {
					keys[n.Content[i].Line] = k
				}
				walk(n.Content[i+1], k+".")
			}
		}
	}
	walk(&root, "")
	return lineRef.ReplaceAllStringFunc(msg, func(m string) string {
		line, _ := strconv.Atoi(lineRef.FindStringSubmatch(m)[1])
		if k, ok := keys[line]; ok {
			return "line " + strconv.Itoa(line) + " (" + k + "):"
		}
		return m
	})
}

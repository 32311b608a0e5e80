package statuspage

import "io/fs"

// Files returns the embedded page files, for tests.
func Files() fs.FS {
	f, _ := fs.Sub(static, "static")
	return f
}

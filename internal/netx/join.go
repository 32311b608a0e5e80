package netx

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Join copies between two TCP connections until both directions are done:
// an EOF on one side is passed on as a half-close (CloseWrite) of the
// other, an error or reset on either side resets both, and a pair idle for
// longer than idle (zero: never) is reset. ar, if not nil, is read instead
// of a (a buffered reader in front of it). Join closes both connections
// and returns the bytes copied a->b and b->a.
func Join(a net.Conn, ar io.Reader, b net.Conn, idle time.Duration) (ab, ba int64, err error) {
	return JoinCounted(a, ar, b, idle, nil, nil)
}

// JoinCounted is Join that also adds the bytes to cab (a->b) and cba
// (b->a) as each chunk passes; nil counters are skipped.
func JoinCounted(a net.Conn, ar io.Reader, b net.Conn, idle time.Duration, cab, cba *atomic.Int64) (ab, ba int64, err error) {
	if ar == nil {
		ar = a
	}
	j := &joiner{idle: NewIdle(idle), aborted: make(chan struct{})}
	done := make(chan struct{})
	go func() {
		defer close(done)
		ba = j.copy(a, b, b, cba)
	}()
	ab = j.copy(b, ar, a, cab)
	<-done
	select {
	case <-j.aborted:
		return ab, ba, j.err
	default:
		_ = a.Close()
		_ = b.Close()
		return ab, ba, nil
	}
}

type joiner struct {
	idle    *Idle
	once    sync.Once
	aborted chan struct{}
	err     error
}

func (j *joiner) abort(err error, a, b net.Conn) {
	j.once.Do(func() {
		j.err = err
		close(j.aborted)
		Reset(a)
		Reset(b)
	})
}

// copy moves src -> dst; rc is the connection behind src (for deadlines
// and readiness). src may be a buffered reader over rc: while it holds
// bytes, there is no readiness wait.
func (j *joiner) copy(dst net.Conn, src io.Reader, rc net.Conn, count *atomic.Int64) int64 {
	var n int64
	rd := NewReadable(rc)
	bufd, _ := src.(interface{ Buffered() int })
	if dl := j.idle.Deadline(); !dl.IsZero() {
		_ = rc.SetReadDeadline(dl)
	}
	bulk := false // the last read filled BulkThreshold: read in bulk buffers
	for {
		var err error
		if bufd == nil || bufd.Buffered() == 0 {
			err = rd.Wait()
		}
		if err == nil {
			bp := GetBufFor(bulk)
			var m int
			m, err = src.Read((*bp)[:len(*bp)-4])
			bulk = m >= BulkThreshold
			if m > 0 {
				j.idle.Touch()
				if _, werr := dst.Write((*bp)[:m]); werr != nil {
					PutBuf(bp)
					j.abort(werr, dst, rc)
					return n
				}
				n += int64(m)
				if count != nil {
					count.Add(int64(m))
				}
			}
			PutBuf(bp)
		}
		switch {
		case err == nil:
		case errors.Is(err, io.EOF):
			CloseWrite(dst)
			return n
		default:
			select {
			case <-j.aborted:
				return n
			default:
			}
			if expired, isTimeout := j.idle.Expired(err); isTimeout && !expired {
				_ = rc.SetReadDeadline(j.idle.Deadline())
				continue
			}
			j.abort(err, dst, rc)
			return n
		}
	}
}

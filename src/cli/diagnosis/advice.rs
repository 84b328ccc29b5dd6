//! What each pattern means and where to look, in the words of the owner's runtime, and
//! what its collector can still do. Pure text.
//!
//! "The GC may close" is said only where a collector can close the socket: a Socket nothing
//! watches in a JVM that no full collection is known to have survived, and a Go net.Conn.
//! Never for CPython (it closes a socket object at its last reference, so one still open
//! is referenced), Node (an open handle is referenced by its loop) or native code.

use super::pattern::Pattern;
use super::runtime::Runtime;

/// Go's poller, said where it shows when the runtime is not known.
macro_rules! go_poller {
    () => {
        "(Go keeps an fd registered until Close(), so a dropped Go connection shows here too: \
look for a net.Conn never closed.)"
    };
}

/// The idle connection of a pool, the same in every runtime but for the examples.
macro_rules! pool_idle {
    ($examples:literal, $fewer:literal) => {
        concat!(
            "an idle connection of a pool that looks at a connection only when it hands it \
out (",
            $examples,
            "): the server closed it while it sat idle. Harmless, and safe to reap: the pool \
opens a new connection at its next checkout. To keep fewer: ",
            $fewer,
            "."
        )
    };
}

/// What `p` means in a process running `rt`, and where to look in the code.
pub fn advice(p: Pattern, rt: Runtime) -> &'static str {
    use Pattern as P;
    use Runtime as R;
    match (p, rt) {
        (P::Unaccepted, _) => "the accept loop is stalled or too slow.",
        (P::DeadHeld, _) => {
            "the connection is over (the peer reset it, often a keepalive probe after its \
FIN_WAIT2 timed out) and the app still holds the fd: the same leak as CLOSE_WAIT, one step \
later. Only close() or a restart frees it; shutdown cannot."
        }

        (P::EofIgnored, R::Jvm) => {
            "a selector (NIO, Netty) still has the channel registered after read() returned \
-1: close the channel in that branch."
        }
        (P::NotRead, R::Jvm) => {
            "the selector loop stopped reading this channel (OP_READ off, autoRead off, \
backpressure) or its handler is stuck: a thread dump (jcmd PID Thread.print) shows where."
        }
        (P::EofUnwatched, R::Jvm) => {
            "a thread read the EOF (read() returned -1) and returned without close(): close \
the Socket in a finally block, or open it with try-with-resources."
        }
        (P::Abandoned, R::Jvm) => {
            "no thread reads it: the Socket was parked or dropped without close() (look at \
error and timeout paths), or the thread that owns it is stuck elsewhere (jcmd PID \
Thread.print shows where)."
        }
        (P::PoolIdle, R::Jvm) => pool_idle!(
            "Apache HttpClient, JDBC pools",
            "evict idle connections (HttpClient's evictIdleConnections, a pool idleTimeout \
below the server's)"
        ),

        (P::EofIgnored, R::Python) => {
            "a selectors or asyncio loop read b'' and kept the socket registered: close it \
in the b'' branch (asyncio: a protocol whose eof_received() returns True must close the \
transport)."
        }
        (P::NotRead, R::Python) => {
            "the loop stopped reading this connection (asyncio pause_reading() under \
backpressure, a stuck handler)."
        }
        (P::EofUnwatched, R::Python) => {
            "a thread read b'' and returned without close(), and the socket object is still \
referenced, for CPython closes one nothing references at once: close it in a finally block \
or with `with`, and look for a list or dict that keeps connections."
        }
        (P::Abandoned, R::Python) => {
            "no code reads it, and the socket object is still referenced, for CPython closes \
one nothing references at once: look for a list, a dict or a handler that keeps connections \
on error and timeout paths."
        }
        (P::PoolIdle, R::Python) => pool_idle!(
            "urllib3 and requests, most database and Redis clients",
            "a pool no larger than the traffic needs (urllib3's maxsize), or a client idle \
timeout below the server's keep-alive timeout"
        ),

        (P::EofIgnored, R::Node) => {
            "a socket still registered after its EOF: a handle kept open after 'end': end() \
or destroy() it there."
        }
        (P::NotRead, R::Node) => {
            "Node paused the socket and never resumed it: backpressure from a request body \
nobody reads (a handler that never responds nor consumes req), or socket.pause(). libuv \
takes a paused fd out of its epoll set, so the peer's FIN is never read. Respond, or \
req.resume() to drain a body you do not need, or destroy the socket; server.requestTimeout \
bounds how long a request may take."
        }
        (P::EofUnwatched, R::Node) => {
            "the app read the EOF, stopped watching and kept the fd, as Node does with \
allowHalfOpen while it waits for end(): end() or destroy() the socket on 'end'."
        }

        (P::EofIgnored, R::Go) => {
            "Go keeps an fd registered until Close(): a net.Conn read to io.EOF and never \
closed, kept or dropped: defer conn.Close() in the handler."
        }
        (P::NotRead, R::Go) => {
            "a handler stopped reading this net.Conn (stuck on a lock, a channel or a slow \
backend), or dropped it unread: Go keeps an fd registered until Close()."
        }

        (P::EofIgnored, R::Other) => {
            "the event loop read the EOF and never closed: close(fd) in the read()==0 branch \
(taking it out of epoll is not enough)."
        }
        (P::NotRead, R::Other) => {
            "the loop stopped reading this connection (no EPOLLIN in its interest, \
backpressure, a stuck handler)."
        }
        (P::EofUnwatched, R::Other) => {
            "read() returned 0 and the code stopped watching the fd (EPOLL_CTL_DEL, or freed \
its connection) without close(fd): close it there, and on every path that frees a \
connection."
        }
        (P::Abandoned, R::Other) => {
            "no code reads or watches it: the fd was left behind without close() (error and \
timeout paths, a connection struct freed without closing its fd)."
        }
        (P::PoolIdle, R::Other) => pool_idle!(
            "libcurl's connection cache, database pools",
            "a smaller pool, or a client idle timeout below the server's keep-alive timeout"
        ),

        // Unknown runtimes, and what a runtime cannot show (Node reads every socket it
        // has not paused; Go watches every one).
        (P::EofIgnored, _) => concat!(
            "the event loop read the EOF and never closed: check the read()==0 branch. ",
            go_poller!()
        ),
        (P::NotRead, _) => concat!(
            "the loop stopped reading this connection (paused, backpressure, a stuck \
handler). ",
            go_poller!()
        ),
        (P::EofUnwatched, _) => {
            "the app read the EOF, stopped watching the socket and kept the fd: check what \
the code does at EOF (Node with allowHalfOpen waits for end(); a thread or a loop may forget \
the connection without close())."
        }
        (P::Abandoned, _) => {
            "no code reads or watches it: the connection was parked or dropped without \
close(). Look at error and timeout paths."
        }
        (P::PoolIdle, _) => pool_idle!(
            "HTTP, database and Redis clients",
            "a smaller pool, or a client idle timeout below the server's keep-alive timeout"
        ),
    }
}

/// What a collector can still do for `n` sockets of a process running `rt`: `may` when it
/// may close them, else they are known to have survived one. None where there is no
/// collector to speak of.
pub fn gc_note(rt: Runtime, may: bool, n: usize, pid: i32) -> Option<String> {
    let them = if n == 1 { "it" } else { "them" };
    match (rt, may) {
        (Runtime::Jvm, true) => Some(format!(
            "{n} not yet through a full collection since CLOSE_WAIT: if the program dropped \
the Socket, the GC may close {them} (its Cleaner closes the fd once a collection finds the \
Socket unreachable). `jcmd {pid} GC.run` (a full collection, a pause) tells them apart: a \
dropped Socket goes, a kept one stays."
        )),
        (Runtime::Jvm, false) => Some(format!(
            "{n} survived a full collection that started after {} entered CLOSE_WAIT: the \
program still references the Socket (a list, a map, a pool), and the GC will not close {them}.",
            if n == 1 { "it" } else { "they" }
        )),
        (Runtime::Go, _) => Some(format!(
            "{n}: if nothing references the net.Conn any more, the GC may close {them}, for its \
finalizer closes the fd after a collection; an idle program may not collect for a long time."
        )),
        _ => None,
    }
}

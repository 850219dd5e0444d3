//! [`FaultProxy`]: a loopback TCP proxy that injects network faults between a client (a
//! layer's connection pool) and its server (Redis, PostgreSQL, …).
//!
//! Every accepted connection is forwarded to the upstream address by one task, which copies
//! bytes both ways in chunks. Each chunk is stamped when it is read and written once it is
//! due (its read time plus the [latency](FaultProxy::set_latency)) and the proxy is not
//! [stalled](FaultProxy::stall): chunks keep their order and none is lost. Connections can
//! be closed cleanly ([`drop_connections`](FaultProxy::drop_connections)) or reset
//! ([`reset_connections`](FaultProxy::reset_connections)), and new ones turned away
//! ([`refuse`](FaultProxy::refuse)).

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::AbortHandle;
use tokio::time::Instant;

/// The most bytes one read takes, and so the largest chunk forwarded.
const CHUNK_BYTES: usize = 16 * 1024;
/// Chunks read but not yet written, per direction (then reading waits: backpressure).
const CHUNKS_IN_FLIGHT: usize = 64;
/// How long a cleanly closed connection is drained (what the peer still sends is read and
/// discarded) so that closing it sends a FIN rather than a reset.
const DRAIN_FOR: Duration = Duration::from_secs(1);

/// The faults currently in force.
#[derive(Debug, Clone, Copy, Default)]
struct Faults {
    latency: Duration,
    stalled: bool,
    refuse: bool,
}

/// How an open connection is told to close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Close {
    /// `shutdown(Write)` both sockets (FIN), drain them briefly, then close.
    Fin,
    /// Close both sockets with `SO_LINGER` 0: an RST.
    Reset,
}

/// The open connections, by id.
#[derive(Debug, Default)]
struct Registry {
    open: HashMap<u64, oneshot::Sender<Close>>,
    stopped: bool,
}

/// What the accept loop and the connection tasks share with the handle.
#[derive(Debug)]
struct Shared {
    upstream: SocketAddr,
    faults: watch::Sender<Faults>,
    registry: Mutex<Registry>,
    next_id: AtomicU64,
    accepted: AtomicU64,
}

impl Shared {
    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tells every open connection to close `how`, and forgets them.
    fn close_all(&self, how: Close) {
        let open: Vec<_> = self.registry().open.drain().collect();
        for (_, tx) in open {
            // A connection that ended by itself meanwhile has dropped its receiver.
            let _ = tx.send(how);
        }
    }

    fn deregister(&self, id: u64) {
        self.registry().open.remove(&id);
    }
}

/// Stops everything when the last handle goes.
#[derive(Debug)]
struct Inner {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: AbortHandle,
}

impl Inner {
    fn stop(&self) {
        self.accept.abort();
        let open: Vec<_> = {
            let mut registry = self.shared.registry();
            registry.stopped = true;
            registry.open.drain().collect()
        };
        // Dropping the senders closes the connections (cleanly, as `drop_connections`).
        drop(open);
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A fault-injecting TCP proxy on loopback, for tests of how a client behaves when the
/// network misbehaves: latency, a stall (a black hole that keeps connections open),
/// connections closed or reset under the client, a server that turns connections away.
///
/// It listens on `127.0.0.1` on a port of its own ([`addr`](Self::addr)) and forwards each
/// accepted connection to the upstream address given to [`start`](Self::start). Cheap to
/// clone: clones control the same proxy, which stops (listener and every connection) on
/// [`stop`](Self::stop) or when the last clone is dropped. Needs a tokio runtime with the
/// time driver enabled.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use capacitor_core::testkit::FaultProxy;
/// use tokio::io::{AsyncReadExt, AsyncWriteExt};
/// use tokio::net::{TcpListener, TcpStream};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> std::io::Result<()> {
/// // A server that echoes one message.
/// let server = TcpListener::bind("127.0.0.1:0").await?;
/// let upstream = server.local_addr()?;
/// tokio::spawn(async move {
///     let (mut socket, _) = server.accept().await?;
///     let mut buf = [0u8; 5];
///     socket.read_exact(&mut buf).await?;
///     socket.write_all(&buf).await?;
///     std::io::Result::Ok(())
/// });
///
/// let proxy = FaultProxy::start(upstream).await?;
/// proxy.set_latency(Duration::from_millis(10));
/// let mut client = TcpStream::connect(proxy.addr()).await?;
/// client.write_all(b"hello").await?;
/// let mut echoed = [0u8; 5];
/// client.read_exact(&mut echoed).await?;
/// assert_eq!(&echoed, b"hello");
/// assert_eq!(proxy.connections(), 1);
///
/// proxy.reset_connections(); // the client's next read fails with ECONNRESET
/// proxy.stop();
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct FaultProxy {
    inner: Arc<Inner>,
}

impl fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let faults = *self.inner.shared.faults.borrow();
        f.debug_struct("FaultProxy")
            .field("addr", &self.inner.addr)
            .field("upstream", &self.inner.shared.upstream)
            .field("latency", &faults.latency)
            .field("stalled", &faults.stalled)
            .field("refuse", &faults.refuse)
            .field("connections", &self.connections())
            .finish()
    }
}

impl FaultProxy {
    /// Listens on `127.0.0.1:0` and forwards every accepted connection to `upstream`, with
    /// no fault in force.
    ///
    /// # Errors
    ///
    /// When the listener cannot be bound.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub async fn start(upstream: SocketAddr) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let (faults, _) = watch::channel(Faults::default());
        let shared = Arc::new(Shared {
            upstream,
            faults,
            registry: Mutex::new(Registry::default()),
            next_id: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone())).abort_handle();
        Ok(FaultProxy {
            inner: Arc::new(Inner { addr, shared, accept }),
        })
    }

    /// Starts a proxy in front of the server `url` names
    /// (`scheme://[user[:password]@]host[:port][/…]`, `default_port` when it has none) and
    /// returns it with `url` pointed at the proxy (user, password, path and query kept).
    ///
    /// # Errors
    ///
    /// When the host does not resolve or the listener cannot be bound.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub async fn in_front_of(url: &str, default_port: u16) -> io::Result<(FaultProxy, String)> {
        let start = url.find("://").map_or(0, |i| i + 3);
        let end = url[start..].find(['/', '?']).map_or(url.len(), |i| start + i);
        let host = url[start..end].rfind('@').map_or(start, |i| start + i + 1);
        let authority = &url[host..end];
        // `[::1]:6379` and `host:6379` carry a port; `[::1]` and `host` do not.
        let has_port = authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
            && !authority.ends_with(']');
        let target = if has_port {
            authority.to_owned()
        } else {
            format!("{authority}:{default_port}")
        };
        let server = tokio::net::lookup_host(target.as_str())
            .await?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "the host has no address"))?;
        let proxy = FaultProxy::start(server).await?;
        let via = format!("{}{}{}", &url[..host], proxy.addr(), &url[end..]);
        Ok((proxy, via))
    }

    /// Where clients connect: `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Where connections are forwarded.
    pub fn upstream(&self) -> SocketAddr {
        self.inner.shared.upstream
    }

    /// Delays every chunk by `latency`, both ways, from when the proxy reads it (a
    /// propagation delay: throughput is not limited). Applies to chunks read from now on;
    /// `Duration::ZERO` removes it.
    pub fn set_latency(&self, latency: Duration) {
        self.inner.shared.faults.send_modify(|f| f.latency = latency);
    }

    /// Stops forwarding bytes, both ways, on every connection, open or accepted later:
    /// connections stay open and what is sent is held (up to a bounded buffer, then the
    /// sender is pushed back by TCP) until [`resume`](Self::resume).
    pub fn stall(&self) {
        self.inner.shared.faults.send_modify(|f| f.stalled = true);
    }

    /// Forwards bytes again after [`stall`](Self::stall): what was held flows on, in order.
    pub fn resume(&self) {
        self.inner.shared.faults.send_modify(|f| f.stalled = false);
    }

    /// Closes every open connection cleanly: both its sockets (the client's and the
    /// upstream one) are shut down for writing (a FIN: the peer reads end-of-file), then
    /// closed. Bytes held by a stall or latency are discarded. New connections are still
    /// accepted.
    pub fn drop_connections(&self) {
        self.inner.shared.close_all(Close::Fin);
    }

    /// Closes every open connection with a reset (`SO_LINGER` 0, an RST to both peers: the
    /// client's next read or write fails with `ConnectionReset`). New connections are
    /// still accepted.
    pub fn reset_connections(&self) {
        self.inner.shared.close_all(Close::Reset);
    }

    /// While `on`, connections are closed with a reset as soon as they are accepted,
    /// before anything is forwarded (the server is "down"); open ones are left alone
    /// (add [`reset_connections`](Self::reset_connections) for a crash). `refuse(false)`
    /// accepts again.
    pub fn refuse(&self, on: bool) {
        self.inner.shared.faults.send_modify(|f| f.refuse = on);
    }

    /// How many connections are open now (accepted, not yet closed).
    pub fn connections(&self) -> usize {
        self.inner.shared.registry().open.len()
    }

    /// How many connections have been accepted since the start (refused ones included).
    pub fn accepted(&self) -> u64 {
        self.inner.shared.accepted.load(Ordering::Relaxed)
    }

    /// Stops listening and closes every open connection, for every clone of this handle.
    /// Idempotent; also done when the last clone is dropped.
    pub fn stop(&self) {
        self.inner.stop();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let socket = match listener.accept().await {
            Ok((socket, _)) => socket,
            // Out of file descriptors and the like: wait a little rather than spin.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        if shared.faults.borrow().refuse {
            reset(&socket);
            continue;
        }
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut registry = shared.registry();
            if registry.stopped {
                return;
            }
            registry.open.insert(id, tx);
        }
        tokio::spawn(serve(socket, id, rx, shared.clone()));
    }
}

/// Sets `SO_LINGER` to zero, so that closing `socket` sends an RST.
fn reset(socket: &TcpStream) {
    // `set_linger` is deprecated in recent tokio because a non-zero linger blocks the
    // thread on close; zero does not (it is what `set_zero_linger` does), and this form
    // builds with every tokio 1.x.
    #[allow(deprecated)]
    let _ = socket.set_linger(Some(Duration::ZERO));
}

/// Forwards one connection until both directions end, an error, or a close command.
async fn serve(client: TcpStream, id: u64, mut close: oneshot::Receiver<Close>, shared: Arc<Shared>) {
    let upstream = tokio::select! {
        connected = TcpStream::connect(shared.upstream) => connected,
        how = &mut close => {
            finish(client, None, how.unwrap_or(Close::Fin)).await;
            return;
        }
    };
    let Ok(upstream) = upstream else {
        // Nothing listens upstream: the client sees its connection reset.
        shared.deregister(id);
        finish(client, None, Close::Reset).await;
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (mut client, mut upstream) = (client, upstream);
    let how = {
        let (client_read, client_write) = client.split();
        let (upstream_read, upstream_write) = upstream.split();
        let forward = async {
            tokio::try_join!(
                direction(client_read, upstream_write, &shared.faults),
                direction(upstream_read, client_write, &shared.faults),
            )
        };
        tokio::select! {
            how = &mut close => Some(how.unwrap_or(Close::Fin)),
            _ = forward => None,
        }
    };
    shared.deregister(id);
    match how {
        Some(how) => finish(client, Some(upstream), how).await,
        // Both directions ended (EOF both ways) or one failed: close both, cleanly.
        None => {
            let _ = client.shutdown().await;
            let _ = upstream.shutdown().await;
        }
    }
}

/// Closes `client` and `upstream` as `how` says.
async fn finish(client: TcpStream, upstream: Option<TcpStream>, how: Close) {
    match how {
        Close::Reset => {
            reset(&client);
            if let Some(upstream) = &upstream {
                reset(upstream);
            }
        }
        Close::Fin => {
            let drain_client = drain(client);
            let drain_upstream = async {
                if let Some(upstream) = upstream {
                    drain(upstream).await;
                }
            };
            tokio::join!(drain_client, drain_upstream);
        }
    }
}

/// Sends a FIN, then reads and discards until the peer closes too (at most
/// [`DRAIN_FOR`]): closing a socket with unread bytes would send an RST instead.
async fn drain(mut socket: TcpStream) {
    let _ = socket.shutdown().await;
    let deadline = Instant::now() + DRAIN_FOR;
    let mut buf = vec![0u8; CHUNK_BYTES];
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, socket.read(&mut buf)).await {
        if n == 0 {
            break;
        }
    }
}

/// Copies `from` to `to`, chunk by chunk, each chunk delayed by the latency in force when
/// it was read and held while stalled; at end-of-file, shuts `to` down for writing.
async fn direction(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    faults: &watch::Sender<Faults>,
) -> io::Result<()> {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(CHUNKS_IN_FLIGHT);
    let read = async move {
        loop {
            let mut buf = vec![0u8; CHUNK_BYTES];
            let n = from.read(&mut buf).await?;
            if n == 0 {
                return io::Result::Ok(());
            }
            buf.truncate(n);
            let due = Instant::now() + faults.borrow().latency;
            if tx.send((due, buf)).await.is_err() {
                return Ok(());
            }
        }
    };
    let mut state = faults.subscribe();
    let write = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            // The sender lives as long as the proxy, so this only fails once it is gone.
            if state.wait_for(|f| !f.stalled).await.is_err() {
                return Err(io::Error::other("the proxy stopped"));
            }
            to.write_all(&chunk).await?;
        }
        to.shutdown().await
    };
    tokio::try_join!(read, write).map(|_| ())
}

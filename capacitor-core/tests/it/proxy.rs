//! `testkit::FaultProxy` against a tiny echo server of the test's own, on loopback:
//! pass-through, latency, stall and resume, clean close, reset, refusal, stop.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use capacitor_core::testkit::{within, FaultProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Every test body runs under this bound.
const TEST_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a read that must not complete is given.
const QUIET: Duration = Duration::from_millis(300);

/// An echo server on `127.0.0.1:0`: what it reads on a connection it writes back.
struct Echo {
    addr: SocketAddr,
    /// Connections it accepted.
    accepted: Arc<AtomicUsize>,
    /// Connections open on its side.
    open: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Echo {
    async fn start() -> Echo {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let (a, o) = (accepted.clone(), open.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    continue;
                };
                a.fetch_add(1, Ordering::SeqCst);
                o.fetch_add(1, Ordering::SeqCst);
                let o = o.clone();
                tokio::spawn(async move {
                    let (mut r, mut w) = socket.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    o.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Echo {
            addr,
            accepted,
            open,
            task,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits until `cond` holds, failing the test after `within`.
async fn eventually(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `len` bytes of a pattern that shows reordering or loss.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ ((i >> 8) as u8))
        .collect()
}

/// Writes `msg` and reads as many bytes back.
async fn round_trip(stream: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    stream.write_all(msg).await.expect("write");
    let mut back = vec![0u8; msg.len()];
    stream.read_exact(&mut back).await.expect("read the echo");
    back
}

async fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.expect("connect to the proxy")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_pass_through_both_ways_unchanged() {
    within(TEST_TIMEOUT, async {
        let echo = Echo::start().await;
        let proxy = FaultProxy::start(echo.addr).await.expect("start");
        assert!(proxy.addr().ip().is_loopback());
        assert_ne!(proxy.addr(), echo.addr);
        assert_eq!(proxy.upstream(), echo.addr);

        let stream = connect(proxy.addr()).await;
        // More than the proxy's buffers hold, written and read at once.
        let sent = pattern(4 * 1024 * 1024 + 17, 7);
        let (mut r, mut w) = stream.into_split();
        let to_send = sent.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&to_send).await.expect("write");
            w.shutdown().await.expect("shutdown");
        });
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.expect("read to the end");
        writer.await.expect("writer");
        assert_eq!(back.len(), sent.len());
        assert!(back == sent, "the bytes came back changed or reordered");
        assert_eq!(echo.accepted(), 1);
        assert_eq!(proxy.accepted(), 1);

        // Both sides half-closed: the proxy forgets the connection, the server's ends.
        eventually("the connection is closed", Duration::from_secs(5), || {
            proxy.connections() == 0 && echo.open() == 0
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_is_added_each_way() {
    within(TEST_TIMEOUT, async {
        let echo = Echo::start().await;
        let proxy = FaultProxy::start(echo.addr).await.expect("start");
        let mut stream = connect(proxy.addr()).await;
        let started = Instant::now();
        assert_eq!(round_trip(&mut stream, b"warm").await, b"warm");
        let baseline = started.elapsed();

        let latency = Duration::from_millis(150);
        proxy.set_latency(latency);
        // Every round trip pays the latency both ways; the fastest of them pays little more
        // (a slow one is the loaded machine's doing, not the proxy's).
        let mut fastest = Duration::MAX;
        for i in 0..3u8 {
            let msg = pattern(1000, i);
            let started = Instant::now();
            assert_eq!(round_trip(&mut stream, &msg).await, msg);
            let took = started.elapsed();
            assert!(
                took >= 2 * latency,
                "a round trip took {took:?}, under twice {latency:?}"
            );
            fastest = fastest.min(took);
        }
        assert!(
            fastest < 2 * latency + Duration::from_secs(1),
            "the fastest round trip took {fastest:?}"
        );

        // Without latency, the fastest of a few round trips is well under it.
        proxy.set_latency(Duration::ZERO);
        let mut fastest = Duration::MAX;
        for _ in 0..5 {
            let started = Instant::now();
            assert_eq!(round_trip(&mut stream, b"fast").await, b"fast");
            fastest = fastest.min(started.elapsed());
        }
        assert!(
            fastest < latency,
            "without latency the fastest round trip took {fastest:?} (first one {baseline:?})"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_holds_every_byte_in_order_until_resume() {
    within(TEST_TIMEOUT, async {
        let echo = Echo::start().await;
        let proxy = FaultProxy::start(echo.addr).await.expect("start");
        let mut stream = connect(proxy.addr()).await;
        assert_eq!(round_trip(&mut stream, b"before").await, b"before");

        proxy.stall();
        // Many writes of distinct content while stalled: all held, none lost or reordered.
        let mut sent = Vec::new();
        for i in 0..50u8 {
            let msg = pattern(3000 + usize::from(i), i);
            stream.write_all(&msg).await.expect("write while stalled");
            sent.extend_from_slice(&msg);
        }
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(QUIET, stream.read(&mut buf)).await;
        assert!(read.is_err(), "a read completed while stalled: {read:?}");

        // A connection made while stalled is accepted and stalls too.
        let mut late = connect(proxy.addr()).await;
        late.write_all(b"late").await.expect("write");
        let read = tokio::time::timeout(QUIET, late.read(&mut buf)).await;
        assert!(
            read.is_err(),
            "a new connection's read completed while stalled: {read:?}"
        );
        // `connect` returns once the kernel completed the handshake; the proxy's accept
        // may come later on a loaded machine.
        eventually("the proxy holds both connections", Duration::from_secs(5), || {
            proxy.connections() == 2
        })
        .await;

        proxy.resume();
        let mut back = vec![0u8; sent.len()];
        stream.read_exact(&mut back).await.expect("read after resume");
        assert!(back == sent, "bytes were lost or reordered across the stall");
        let mut late_back = [0u8; 4];
        late.read_exact(&mut late_back)
            .await
            .expect("late read after resume");
        assert_eq!(&late_back, b"late");
        assert_eq!(round_trip(&mut stream, b"after").await, b"after");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_read_end_of_file_and_new_ones_work() {
    within(TEST_TIMEOUT, async {
        let echo = Echo::start().await;
        let proxy = FaultProxy::start(echo.addr).await.expect("start");
        let mut a = connect(proxy.addr()).await;
        let mut b = connect(proxy.addr()).await;
        assert_eq!(round_trip(&mut a, b"a").await, b"a");
        assert_eq!(round_trip(&mut b, b"b").await, b"b");
        assert_eq!(proxy.connections(), 2);

        proxy.drop_connections();
        assert_eq!(proxy.connections(), 0);
        for stream in [&mut a, &mut b] {
            let mut buf = [0u8; 8];
            let n = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf))
                .await
                .expect("the client sees the close at once")
                .expect("a clean close, not an error");
            assert_eq!(n, 0, "expected end-of-file");
        }
        eventually("the server's ends close", Duration::from_secs(5), || {
            echo.open() == 0
        })
        .await;

        let mut c = connect(proxy.addr()).await;
        assert_eq!(round_trip(&mut c, b"again").await, b"again");
        assert_eq!(proxy.connections(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_connections_fail_with_connection_reset_and_new_ones_work() {
    within(TEST_TIMEOUT, async {
        let echo = Echo::start().await;
        let proxy = FaultProxy::start(echo.addr).await.expect("start");
        let mut a = connect(proxy.addr()).await;
        assert_eq!(round_trip(&mut a, b"a").await, b"a");

        proxy.reset_connections();
        let mut buf = [0u8; 8];
        let read = tokio::time::timeout(Duration::from_secs(2), a.read(&mut buf))
            .await
            .expect("the client sees the reset at once");
        let err = read.expect_err("a reset is an error, not end-of-file");
        assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
        eventually("the server's end closes", Duration::from_secs(5), || {
            echo.open() == 0
        })
        .await;
        assert_eq!(proxy.connections(), 0);

        let mut b = connect(proxy.addr()).await;
        assert_eq!(round_trip(&mut b, b"again").await, b"again");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_close_at_once_until_refusal_is_lifted() {
    within(TEST_TIMEOUT, async {
        let echo = Echo::start().await;
        let proxy = FaultProxy::start(echo.addr).await.expect("start");
        let mut open = connect(proxy.addr()).await;
        assert_eq!(round_trip(&mut open, b"open").await, b"open");

        proxy.refuse(true);
        for _ in 0..3 {
            // The reset may arrive before `connect` returns, which then fails with it.
            let Ok(mut refused) = TcpStream::connect(proxy.addr()).await else {
                continue;
            };
            let mut buf = [0u8; 8];
            let _ = refused.write_all(b"hello?").await;
            let read = tokio::time::timeout(Duration::from_secs(1), refused.read(&mut buf))
                .await
                .expect("a refused connection is closed at once");
            assert!(
                matches!(read, Ok(0) | Err(_)),
                "a refused connection read {read:?}"
            );
        }
        assert_eq!(echo.accepted(), 1, "nothing reached the server");
        assert_eq!(proxy.accepted(), 4);
        // Connections open before the refusal carry on.
        assert_eq!(round_trip(&mut open, b"still").await, b"still");
        assert_eq!(proxy.connections(), 1);

        proxy.refuse(false);
        let mut again = connect(proxy.addr()).await;
        assert_eq!(round_trip(&mut again, b"again").await, b"again");
        assert_eq!(echo.accepted(), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_and_dropping_the_last_handle_close_the_listener_and_connections() {
    within(TEST_TIMEOUT, async {
        let echo = Echo::start().await;
        for explicit in [true, false] {
            let proxy = FaultProxy::start(echo.addr).await.expect("start");
            let addr = proxy.addr();
            let mut stream = connect(addr).await;
            assert_eq!(round_trip(&mut stream, b"x").await, b"x");
            let clone = proxy.clone();
            assert!(format!("{clone:?}").contains("FaultProxy"));
            if explicit {
                clone.stop();
                drop(proxy);
            } else {
                drop(clone);
                // Another handle still runs it.
                assert_eq!(round_trip(&mut stream, b"y").await, b"y");
                drop(proxy);
            }
            let mut buf = [0u8; 8];
            let n = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buf))
                .await
                .expect("the connection is closed");
            assert!(matches!(n, Ok(0)), "expected end-of-file, got {n:?}");
            let deadline = Instant::now() + Duration::from_secs(5);
            while TcpStream::connect(addr).await.is_ok() {
                assert!(Instant::now() < deadline, "the listener still accepts");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    })
    .await;
}

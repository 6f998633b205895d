//! A link emulator: a TCP proxy placed between two haul agents whose faults can be changed
//! while traffic flows. `tc netem` is not available here, so delay, rate caps, cuts, stalls and
//! resets are made in user space, per direction, on every forwarded piece.
//!
//! The model of a long, shared path:
//! - a delay line: each piece is forwarded `delay` after it was read, while later pieces keep
//!   arriving behind it, so a window's worth of bytes is in flight as on a real path;
//! - a link rate shared by every connection through the link, per direction (the bottleneck);
//! - a cap per TCP connection, per direction: what one flow gets on a lossy long path
//!   (about MSS / (RTT * sqrt(loss))), so that several connections can fill what one cannot;
//! - a bounded queue between reading and forwarding (the bottleneck's buffer): a sender that
//!   outruns the link is held back by TCP, not buffered here without end.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Default)]
struct Faults {
    /// One-way delay added to every forwarded piece, in ms.
    delay_ms: AtomicU64,
    /// Link rate per direction, shared by all connections; 0 = none.
    rate: AtomicU64,
    /// Rate cap per direction of each connection; 0 = none.
    connection_rate: AtomicU64,
    /// When the shared link is free again, per direction (ns since `origin`).
    link_free_up: AtomicU64,
    link_free_down: AtomicU64,
    origin: std::sync::OnceLock<tokio::time::Instant>,
    /// Connections accepted so far.
    connections: AtomicU64,
    /// Reset every connection once this many more bytes have been forwarded; 0 = never.
    cut_after: AtomicU64,
    /// Hold all traffic (connections stay open).
    stalled: AtomicBool,
    /// Bytes forwarded, both directions, all connections.
    forwarded: AtomicU64,
    /// Bytes forwarded from the dialing side to the upstream only (sender to receiver).
    forwarded_up: AtomicU64,
    /// Bumped to reset every open connection.
    generation: AtomicU64,
    cuts: AtomicU64,
}

pub struct Link {
    pub addr: String,
    faults: Arc<Faults>,
    stop: Arc<tokio::sync::Notify>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Link {
    /// Listen on a free loopback port and forward every connection to `upstream`.
    pub fn start(upstream: &str) -> anyhow::Result<Link> {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?.to_string();
        let faults = Arc::new(Faults::default());
        let stop = Arc::new(tokio::sync::Notify::new());
        let (f, s, up) = (faults.clone(), stop.clone(), upstream.to_string());
        let thread = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(listener) = TcpListener::from_std(std_listener) else {
                    return;
                };
                loop {
                    tokio::select! {
                        _ = s.notified() => return,
                        accepted = listener.accept() => {
                            let Ok((client, _)) = accepted else { continue };
                            f.connections.fetch_add(1, Ordering::SeqCst);
                            tokio::spawn(forward(client, up.clone(), f.clone()));
                        }
                    }
                }
            });
        });
        Ok(Link {
            addr,
            faults,
            stop,
            thread: Some(thread),
        })
    }

    pub fn set_delay(&self, one_way: Duration) {
        self.faults
            .delay_ms
            .store(one_way.as_millis() as u64, Ordering::SeqCst);
    }

    /// The link's rate per direction, shared by every connection through it (0 = none).
    pub fn set_rate(&self, bytes_per_sec: u64) {
        self.faults.rate.store(bytes_per_sec, Ordering::SeqCst);
    }

    /// A cap per TCP connection per direction (0 = none), alongside the link rate: one flow's
    /// share of a lossy long path.
    pub fn set_connection_rate(&self, bytes_per_sec: u64) {
        self.faults
            .connection_rate
            .store(bytes_per_sec, Ordering::SeqCst);
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.faults.connections.load(Ordering::SeqCst)
    }

    /// Reset every connection after `bytes` more bytes have crossed (mid-block for big blocks).
    pub fn cut_after(&self, bytes: u64) {
        let at = self.faults.forwarded.load(Ordering::SeqCst) + bytes.max(1);
        self.faults.cut_after.store(at, Ordering::SeqCst);
    }

    pub fn stall(&self, on: bool) {
        self.faults.stalled.store(on, Ordering::SeqCst);
    }

    /// Reset (RST) every open connection now.
    pub fn reset(&self) {
        self.faults.cuts.fetch_add(1, Ordering::SeqCst);
        self.faults.generation.fetch_add(1, Ordering::SeqCst);
    }

    pub fn forwarded(&self) -> u64 {
        self.faults.forwarded.load(Ordering::SeqCst)
    }

    /// Bytes forwarded towards the upstream (what a sender sent a receiver).
    pub fn forwarded_up(&self) -> u64 {
        self.faults.forwarded_up.load(Ordering::SeqCst)
    }

    pub fn cuts(&self) -> u64 {
        self.faults.cuts.load(Ordering::SeqCst)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.stop.notify_one();
        self.reset();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn forward(client: TcpStream, upstream: String, f: Arc<Faults>) {
    let Ok(server) = TcpStream::connect(&upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let generation = f.generation.load(Ordering::SeqCst);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let a = tokio::spawn(pump(cr, sw, f.clone(), generation, true));
    let b = tokio::spawn(pump(sr, cw, f.clone(), generation, false));
    // When either direction ends (or is reset), end both.
    tokio::select! {
        _ = a => {}
        _ = b => {}
    }
}

/// A piece read, and when it may leave.
struct Piece {
    due: tokio::time::Instant,
    bytes: Vec<u8>,
    /// Its room in the direction's buffer, given back once it is forwarded.
    _room: tokio::sync::OwnedSemaphorePermit,
}

/// The most bytes between reading and forwarding in one direction: more than a gigabit path
/// of 200 ms keeps in flight.
const QUEUE_BYTES: u64 = 64 << 20;

/// The buffer of a direction, in KiB: what the path keeps in flight (its rate times the delay)
/// twice over, as a bottleneck's buffer would, so a sender that outruns the path is held back
/// by TCP instead of filling a buffer no real path has. Counted in bytes, not reads: a TLS
/// peer's small writes would otherwise shrink it, and with it what one flow can carry (a
/// buffer of 64 reads of 4 KiB over 75 ms passes 3.4 MB/s). Set when the connection opens.
fn queue_kib(f: &Faults) -> usize {
    let rate = match (
        f.rate.load(Ordering::SeqCst),
        f.connection_rate.load(Ordering::SeqCst),
    ) {
        (0, 0) => return (QUEUE_BYTES / 1024) as usize,
        (0, c) | (c, 0) => c,
        (r, c) => r.min(c),
    };
    let delay_ms = f.delay_ms.load(Ordering::SeqCst).max(1);
    let bytes = (rate as u128 * delay_ms as u128 * 2 / 1000) as u64;
    (bytes.clamp(1 << 20, QUEUE_BYTES) / 1024) as usize
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    f: Arc<Faults>,
    generation: u64,
    up: bool,
) {
    let reset = |f: &Faults| f.generation.load(Ordering::SeqCst) != generation;
    let room = Arc::new(tokio::sync::Semaphore::new(queue_kib(&f)));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Piece>();
    // The reading side: stamp each piece with when the delay line lets it out.
    let reader = {
        let f = f.clone();
        async move {
            loop {
                let mut buf = vec![0u8; 16 * 1024];
                let n = tokio::select! {
                    r = from.read(&mut buf) => match r { Ok(0) | Err(_) => break, Ok(n) => n },
                    _ = wait_for_reset(&f, generation) => break,
                };
                buf.truncate(n);
                // Room in the buffer first: a full one holds the sender back (by TCP).
                let Ok(room) = room
                    .clone()
                    .acquire_many_owned(n.div_ceil(1024) as u32)
                    .await
                else {
                    break;
                };
                let delay = Duration::from_millis(f.delay_ms.load(Ordering::SeqCst));
                let piece = Piece {
                    due: tokio::time::Instant::now() + delay,
                    bytes: buf,
                    _room: room,
                };
                if tx.send(piece).is_err() {
                    break;
                }
            }
            from
        }
    };
    // The forwarding side: wait out the delay, then the link's and the connection's rates.
    let writer = async {
        let mut conn_free = tokio::time::Instant::now();
        while let Some(p) = rx.recv().await {
            tokio::time::sleep_until(p.due).await;
            while f.stalled.load(Ordering::SeqCst) && !reset(&f) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let n = p.bytes.len();
            // Paced from when the piece was due, not from when the timer woke: a timer wakes
            // up to a millisecond late, and counting from then would cost every piece that
            // much (a 16 KiB piece at 50 Mbit/s is 2.6 ms: one flow would get 40 Mbit/s).
            // Late pieces go at once, so the pace catches up.
            let mut leave = p.due;
            let per_conn = f.connection_rate.load(Ordering::SeqCst);
            if per_conn > 0 {
                conn_free =
                    conn_free.max(p.due) + Duration::from_secs_f64(n as f64 / per_conn as f64);
                leave = conn_free;
            }
            let rate = f.rate.load(Ordering::SeqCst);
            if rate > 0 {
                leave = leave.max(reserve_link(&f, up, n, rate));
            }
            tokio::time::sleep_until(leave).await;
            if reset(&f) {
                break;
            }
            let total = f.forwarded.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
            if up {
                f.forwarded_up.fetch_add(n as u64, Ordering::SeqCst);
            }
            let cut = f.cut_after.load(Ordering::SeqCst);
            if cut > 0 && total >= cut {
                f.cut_after.store(0, Ordering::SeqCst);
                // Forward part of this piece, then reset: the cut lands mid-message.
                let _ = to.write_all(&p.bytes[..n / 2]).await;
                f.cuts.fetch_add(1, Ordering::SeqCst);
                f.generation.fetch_add(1, Ordering::SeqCst);
                break;
            }
            if to.write_all(&p.bytes).await.is_err() {
                break;
            }
        }
        to
    };
    let (from, to) = tokio::join!(reader, async {
        let to = writer.await;
        // The writer ended (reset, or the far side closed): stop reading too.
        to
    });
    // An abrupt end: RST rather than FIN where the socket still allows it. A zero linger does
    // not block on drop (the deprecation is about non-zero lingers).
    if let Ok(stream) = from.reunite(to) {
        #[allow(deprecated)]
        let _ = stream.set_linger(Some(Duration::ZERO));
    }
}

/// Reserve `n` bytes of the shared link in one direction; returns when they have crossed it.
fn reserve_link(f: &Faults, up: bool, n: usize, rate: u64) -> tokio::time::Instant {
    let origin = *f.origin.get_or_init(tokio::time::Instant::now);
    let slot = if up {
        &f.link_free_up
    } else {
        &f.link_free_down
    };
    let now = origin.elapsed().as_nanos() as u64;
    let cost = (n as u128 * 1_000_000_000 / rate as u128) as u64;
    let mut free = slot.load(Ordering::SeqCst);
    loop {
        let end = free.max(now) + cost;
        match slot.compare_exchange(free, end, Ordering::SeqCst, Ordering::SeqCst) {
            Ok(_) => return origin + Duration::from_nanos(end),
            Err(actual) => free = actual,
        }
    }
}

async fn wait_for_reset(f: &Faults, generation: u64) {
    while f.generation.load(Ordering::SeqCst) == generation {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

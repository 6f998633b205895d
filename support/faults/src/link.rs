//! A link emulator: a TCP proxy placed between two haul agents whose faults can be changed
//! while traffic flows. `tc netem` is not available here, so delay, rate caps, cuts, stalls and
//! resets are made in user space, per direction, on every forwarded piece.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Default)]
struct Faults {
    /// One-way delay added to every forwarded piece, in ms.
    delay_ms: AtomicU64,
    /// Byte-rate cap per direction per connection; 0 = none.
    rate: AtomicU64,
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

    pub fn set_rate(&self, bytes_per_sec: u64) {
        self.faults.rate.store(bytes_per_sec, Ordering::SeqCst);
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

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    f: Arc<Faults>,
    generation: u64,
    up: bool,
) {
    let mut buf = vec![0u8; 16 * 1024];
    let reset = |f: &Faults| f.generation.load(Ordering::SeqCst) != generation;
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r { Ok(0) | Err(_) => break, Ok(n) => n },
            _ = wait_for_reset(&f, generation) => break,
        };
        while f.stalled.load(Ordering::SeqCst) && !reset(&f) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let delay = f.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let rate = f.rate.load(Ordering::SeqCst);
        if rate > 0 {
            tokio::time::sleep(Duration::from_secs_f64(n as f64 / rate as f64)).await;
        }
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
            let _ = to.write_all(&buf[..n / 2]).await;
            f.cuts.fetch_add(1, Ordering::SeqCst);
            f.generation.fetch_add(1, Ordering::SeqCst);
            break;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    // An abrupt end: RST rather than FIN where the socket still allows it. A zero linger does
    // not block on drop (the deprecation is about non-zero lingers).
    if let Ok(stream) = from.reunite(to) {
        #[allow(deprecated)]
        let _ = stream.set_linger(Some(Duration::ZERO));
    }
}

async fn wait_for_reset(f: &Faults, generation: u64) {
    while f.generation.load(Ordering::SeqCst) == generation {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

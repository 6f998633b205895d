//! The spool: chunks land on the receiver's disk before they go to the target, so a target
//! hiccup is retried from local disk instead of re-crossing the WAN (decision 3 of the brief).
//!
//! A spool file holds the chunk's frames as they arrived, compressed (a `haul_core::frames`
//! file). Reading back decodes each block
//! through the one capped decoder and re-hashes it, so a file altered on disk is caught before
//! its rows can commit.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use haul_core::codec::{decode, Codec};
use haul_core::frames::FrameReader;
use tokio::fs::File;
use tokio::io::{AsyncWriteExt, BufWriter};

/// How long a stream waits for room in a full spool before it gives up its place.
const ROOM_WAIT: Duration = Duration::from_secs(60);

pub struct Spool {
    dir: PathBuf,
    /// The most chunk spool files may hold together (`--spool-size`); 0 = no bound but the disk.
    quota: u64,
    /// Held while checking for room and writing a frame, so two streams cannot both take the
    /// last of it: the bound is exact.
    room: tokio::sync::Mutex<()>,
    /// Woken when a spool file goes away, for streams waiting for room.
    freed: tokio::sync::Notify,
    /// Streams working on a spool file (receiving or restoring), and how many of them wait for
    /// room. When every one waits, none will ever free any: that is a deadlock, not a queue.
    holders: AtomicUsize,
    waiting: AtomicUsize,
}

/// A stream's hold on the spool, from its first frame until its file is gone.
pub struct Hold<'a>(&'a Spool);

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        self.0.holders.fetch_sub(1, Ordering::SeqCst);
        self.0.freed.notify_waiters();
    }
}

/// Counts a stream as waiting for room while it lives.
struct Waiting<'a>(&'a Spool);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Spool {
    pub fn open(dir: &Path, quota: u64) -> anyhow::Result<Spool> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("create spool directory {}", dir.display()))?;
        Ok(Spool {
            dir: dir.to_path_buf(),
            quota,
            room: tokio::sync::Mutex::new(()),
            freed: tokio::sync::Notify::new(),
            holders: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
        })
    }

    /// Count a stream as holding spool space until the returned guard drops.
    pub fn hold(&self) -> Hold<'_> {
        self.holders.fetch_add(1, Ordering::SeqCst);
        Hold(self)
    }

    /// Bytes in chunk spool files now.
    pub fn used(&self) -> u64 {
        self.chunk_files()
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.len())
            .sum()
    }

    /// Append one frame to `w` once the spool has room for it. A full spool first gives up
    /// partial chunks nobody is sending (`Partials::evict_idle`), then holds the stream back (backpressure:
    /// the sender's window fills and it waits) while other chunks restore and free their
    /// files. After a minute without room the stream gives up its own place: its file is
    /// dropped by the caller and the chunk retried later, so streams that each hold part of the
    /// spool cannot wait on each other for ever. When every stream holding spool space is
    /// waiting, nobody will free any: the stream gives up its place after a second instead.
    pub async fn write_frame_in_room(
        &self,
        w: &mut BufWriter<File>,
        path: &Path,
        (codec, raw_len, payload): (Codec, u32, &[u8]),
        partials: &crate::partial::Partials,
    ) -> anyhow::Result<()> {
        let need = 8 + payload.len() as u64;
        let deadline = tokio::time::Instant::now() + ROOM_WAIT;
        let mut warned = false;
        let mut waiting: Option<Waiting<'_>> = None;
        let mut stuck_since: Option<tokio::time::Instant> = None;
        loop {
            let guard = self.room.lock().await;
            if self.quota == 0 || self.used() + need <= self.quota {
                write_frame(w, path, codec, raw_len, payload).await?;
                w.flush().await.map_err(|e| write_error(e, path))?;
                drop(guard);
                return Ok(());
            }
            drop(guard);
            if partials.evict_idle(self).await {
                continue;
            }
            if waiting.is_none() {
                self.waiting.fetch_add(1, Ordering::SeqCst);
                waiting = Some(Waiting(self));
            }
            let now = tokio::time::Instant::now();
            if self.waiting.load(Ordering::SeqCst) >= self.holders.load(Ordering::SeqCst) {
                let since = *stuck_since.get_or_insert(now);
                if now.duration_since(since) >= Duration::from_secs(1) {
                    return Err(haul_core::status::exhausted(format!(
                        "spool directory {} is at its --spool-size ({} bytes) and every stream in it waits for room; this chunk gives up its place and will be retried; raise --spool-size to at least the chunk size times the chunks in flight",
                        self.dir.display(),
                        self.quota
                    )));
                }
            } else {
                stuck_since = None;
            }
            if now >= deadline {
                return Err(haul_core::status::exhausted(format!(
                    "spool directory {} is at its --spool-size ({} bytes) and no chunk freed room for a minute; raise --spool-size to at least the chunk size times the chunks in flight; the chunk will be retried",
                    self.dir.display(),
                    self.quota
                )));
            }
            if !warned {
                tracing::info!(
                    spool = %self.dir.display(),
                    quota = self.quota,
                    "spool is full: holding a stream back until a chunk is restored"
                );
                warned = true;
            }
            tokio::select! {
                _ = self.freed.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    fn job_dir(&self, job_id: &str) -> PathBuf {
        self.dir.join(haul_core::state::path_component(job_id))
    }

    /// One file per chunk, whatever its lease: a stream under a new lease continues the file
    /// where an earlier stream left it. `partial::Partials` lets one stream at a time own it.
    pub fn chunk_path(&self, job_id: &str, chunk_id: u64) -> PathBuf {
        self.job_dir(job_id).join(format!("chunk-{chunk_id}.spool"))
    }

    /// Every chunk spool file present, of every job.
    pub fn chunk_files(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for job in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            for f in std::fs::read_dir(job.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let name = f.file_name();
                let name = name.to_string_lossy();
                if name.starts_with("chunk-") && name.ends_with(".spool") {
                    files.push(f.path());
                }
            }
        }
        files
    }

    pub fn schema_path(&self, job_id: &str, section: &str) -> PathBuf {
        self.job_dir(job_id).join(format!("{section}.sql"))
    }

    pub async fn create(&self, path: &Path) -> anyhow::Result<BufWriter<File>> {
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .with_context(|| format!("create spool directory {}", parent.display()))?;
        }
        let f = File::create(path)
            .await
            .with_context(|| format!("create spool file {}", path.display()))?;
        Ok(BufWriter::with_capacity(256 * 1024, f))
    }

    /// Open a spool file to add frames after its first `len` bytes (a resumed chunk).
    pub async fn append(&self, path: &Path, len: u64) -> anyhow::Result<BufWriter<File>> {
        let mut f = tokio::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .await
            .with_context(|| format!("open spool file {}", path.display()))?;
        f.set_len(len)
            .await
            .with_context(|| format!("truncate spool file {}", path.display()))?;
        tokio::io::AsyncSeekExt::seek(&mut f, std::io::SeekFrom::Start(len))
            .await
            .with_context(|| format!("seek in spool file {}", path.display()))?;
        Ok(BufWriter::with_capacity(256 * 1024, f))
    }

    pub async fn remove(&self, path: &Path) {
        let _ = tokio::fs::remove_file(path).await;
        self.freed.notify_waiters();
    }

    pub async fn remove_job(&self, job_id: &str) {
        let _ = tokio::fs::remove_dir_all(self.job_dir(job_id)).await;
        self.freed.notify_waiters();
    }
}

/// Test fault: change one byte in the middle of a spool file (see `failpoint`).
pub async fn flip_a_byte(path: &Path) {
    if let Ok(mut bytes) = tokio::fs::read(path).await {
        if !bytes.is_empty() {
            let i = bytes.len() / 2;
            bytes[i] ^= 0x5a;
            let _ = tokio::fs::write(path, bytes).await;
        }
    }
}

/// A spool write error, with a full disk named as such: the operator's fix is space.
pub fn write_error(e: std::io::Error, path: &Path) -> anyhow::Error {
    if e.raw_os_error() == Some(28) {
        haul_core::status::exhausted(format!(
            "spool directory {} is full (no space left on device); free space there or point --spool at a larger disk; the chunk will be retried",
            path.parent().map(|p| p.display().to_string()).unwrap_or_default()
        ))
    } else {
        anyhow::Error::new(e).context(format!("write spool file {}", path.display()))
    }
}

pub async fn write_frame(
    w: &mut BufWriter<File>,
    path: &Path,
    codec: Codec,
    raw_len: u32,
    payload: &[u8],
) -> anyhow::Result<()> {
    haul_core::frames::write_frame(w, codec, raw_len, payload)
        .await
        .map_err(|e| write_error(e, path))
}

/// Reads a spool file back block by block, decoded, each with the codec its frame names
/// (`codec`: the file's, for frames written before frames named theirs).
pub struct SpoolReader {
    frames: FrameReader,
    codec: Codec,
}

impl SpoolReader {
    pub async fn open(path: &Path, codec: Codec) -> anyhow::Result<SpoolReader> {
        let frames = FrameReader::open(path)
            .await
            .with_context(|| format!("open spool file {}", path.display()))?;
        Ok(SpoolReader { frames, codec })
    }

    /// Where the next frame starts in the file.
    pub fn position(&self) -> u64 {
        self.frames.position()
    }

    /// The next decoded block, or `None` at the end of the file.
    pub async fn next_block(&mut self) -> anyhow::Result<Option<Vec<u8>>> {
        let Some(frame) = self.frames.next_frame().await? else {
            return Ok(None);
        };
        let codec = frame.codec_or(self.codec);
        let raw = tokio::task::spawn_blocking(move || {
            decode(codec, &frame.payload, frame.raw_len as usize)
        })
        .await
        .context("decode task")??;
        Ok(Some(raw))
    }
}

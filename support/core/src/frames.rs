//! Frame files: compressed blocks on local disk, as they cross the wire. The receiver's spool
//! and the sender's staging area both use them, so one reader and one writer serve both:
//! `[raw_len: u32 LE][payload_len: u32 LE][payload]`, repeated.
//!
//! Reading never trusts the file: a frame that claims more than a message may hold is refused,
//! and a frame cut short (a crash mid-write) reads as the end of the good part.

use std::path::Path;

use anyhow::{bail, Context};
use tokio::fs::File;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

/// Append one frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    raw_len: u32,
    payload: &[u8],
) -> std::io::Result<()> {
    let mut head = [0u8; 8];
    head[..4].copy_from_slice(&raw_len.to_le_bytes());
    head[4..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    w.write_all(&head).await?;
    w.write_all(payload).await
}

/// Reads frames back in order, without decoding them.
pub struct FrameReader<R = BufReader<File>> {
    r: R,
    pos: u64,
}

impl FrameReader {
    pub async fn open(path: &Path) -> anyhow::Result<FrameReader> {
        let f = File::open(path)
            .await
            .with_context(|| format!("open {}", path.display()))?;
        Ok(FrameReader::new(BufReader::with_capacity(256 * 1024, f)))
    }
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(r: R) -> FrameReader<R> {
        FrameReader { r, pos: 0 }
    }

    /// Where the next frame starts: the length of the complete frames read so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The next frame's raw length and compressed payload; `None` at a clean end. A frame
    /// cut short is an error, so callers can tell a torn tail from the end.
    pub async fn next_frame(&mut self) -> anyhow::Result<Option<(u32, Vec<u8>)>> {
        let mut head = [0u8; 8];
        match self.r.read_exact(&mut head[..4]).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e).context("read frame"),
        }
        self.r
            .read_exact(&mut head[4..])
            .await
            .context("frame file truncated")?;
        let raw_len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let payload_len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
        if payload_len > crate::MAX_MESSAGE_BYTES || raw_len as usize > crate::MAX_BLOCK_BYTES {
            bail!("frame claims {payload_len} bytes ({raw_len} raw): the file is corrupt");
        }
        let mut payload = vec![0u8; payload_len];
        self.r
            .read_exact(&mut payload)
            .await
            .context("frame file truncated")?;
        self.pos += 8 + payload_len as u64;
        Ok(Some((raw_len, payload)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_a_torn_tail_is_an_error() -> anyhow::Result<()> {
        let mut buf = Vec::new();
        write_frame(&mut buf, 5, b"hello").await?;
        write_frame(&mut buf, 0, b"").await?;
        let whole = buf.len();
        buf.extend_from_slice(&[3, 0, 0, 0, 9, 0, 0, 0, 1]);
        let mut r = FrameReader::new(&buf[..]);
        assert_eq!(r.next_frame().await?, Some((5, b"hello".to_vec())));
        assert_eq!(r.next_frame().await?, Some((0, Vec::new())));
        assert_eq!(r.position() as usize, whole);
        assert!(r.next_frame().await.is_err());
        let mut clean = FrameReader::new(&buf[..whole]);
        while clean.next_frame().await?.is_some() {}
        Ok(())
    }

    #[tokio::test]
    async fn an_oversized_frame_is_refused() {
        let mut buf = Vec::new();
        buf.extend_from_slice(&1u32.to_le_bytes());
        buf.extend_from_slice(&u32::MAX.to_le_bytes());
        let mut r = FrameReader::new(&buf[..]);
        assert!(r.next_frame().await.is_err());
    }
}

//! Frame files: compressed blocks on local disk, as they cross the wire. The receiver's spool
//! and the sender's staging area both use them, so one reader and one writer serve both:
//! `[raw_len: u32 LE][payload_len: u32 LE][payload]`, repeated.
//!
//! Each frame names its own codec in the top byte of `raw_len`: the codec's wire number plus
//! one in its low two bits, a zstd level above them. A tag of 0 marks a file written before
//! blocks of one chunk could differ; its frames take the file's codec. A raw length never
//! needs that byte: a block is at most [`crate::MAX_BLOCK_BYTES`].
//!
//! Reading never trusts the file: a frame that claims more than a message may hold is refused,
//! and a frame cut short (a crash mid-write) reads as the end of the good part.

use std::path::Path;

use anyhow::{bail, Context};

use crate::codec::Codec;
use tokio::fs::File;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

const TAG_SHIFT: u32 = 24;
const LEN_MASK: u32 = (1 << TAG_SHIFT) - 1;

/// One frame read back: the codec it names (`None` for an untagged frame: the file's codec),
/// its raw length, and its compressed payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub codec: Option<Codec>,
    pub raw_len: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The frame's codec, or `file` for an untagged frame.
    pub fn codec_or(&self, file: Codec) -> Codec {
        self.codec.unwrap_or(file)
    }
}

/// Append one frame of `codec`.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    codec: Codec,
    raw_len: u32,
    payload: &[u8],
) -> std::io::Result<()> {
    if raw_len > LEN_MASK {
        return Err(std::io::Error::other(format!(
            "block of {raw_len} raw bytes is too large for a frame"
        )));
    }
    let (wire, level) = codec.to_wire();
    let tag = (wire as u32 + 1) | ((level.clamp(0, 63) as u32) << 2);
    let mut head = [0u8; 8];
    head[..4].copy_from_slice(&(raw_len | tag << TAG_SHIFT).to_le_bytes());
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

    /// The next frame; `None` at a clean end. A frame cut short is an error, so callers can
    /// tell a torn tail from the end.
    pub async fn next_frame(&mut self) -> anyhow::Result<Option<Frame>> {
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
        let word = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let raw_len = word & LEN_MASK;
        let codec = match word >> TAG_SHIFT {
            0 => None,
            tag => Some(
                Codec::from_wire((tag & 3) as i32 - 1, (tag >> 2) as i32)
                    .with_context(|| format!("frame names codec tag {tag}: the file is corrupt"))?,
            ),
        };
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
        Ok(Some(Frame {
            codec,
            raw_len,
            payload,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_a_torn_tail_is_an_error() -> anyhow::Result<()> {
        let mut buf = Vec::new();
        write_frame(&mut buf, Codec::None, 5, b"hello").await?;
        write_frame(&mut buf, Codec::Lz4, 0, b"").await?;
        let whole = buf.len();
        buf.extend_from_slice(&[3, 0, 0, 0, 9, 0, 0, 0, 1]);
        let mut r = FrameReader::new(&buf[..]);
        let frame = |codec, raw_len, payload: &[u8]| Frame {
            codec,
            raw_len,
            payload: payload.to_vec(),
        };
        assert_eq!(
            r.next_frame().await?,
            Some(frame(Some(Codec::None), 5, b"hello"))
        );
        assert_eq!(r.next_frame().await?, Some(frame(Some(Codec::Lz4), 0, b"")));
        assert_eq!(r.position() as usize, whole);
        assert!(r.next_frame().await.is_err());
        let mut clean = FrameReader::new(&buf[..whole]);
        while clean.next_frame().await?.is_some() {}
        Ok(())
    }

    #[tokio::test]
    async fn frames_name_their_codec_and_untagged_frames_take_the_files() -> anyhow::Result<()> {
        let mut buf = Vec::new();
        write_frame(&mut buf, Codec::Zstd { level: 9 }, 7, b"payload").await?;
        // A frame from before tags: the raw length alone.
        buf.extend_from_slice(&2u32.to_le_bytes());
        buf.extend_from_slice(&2u32.to_le_bytes());
        buf.extend_from_slice(b"ab");
        // A tag no codec has.
        buf.extend_from_slice(&(1u32 | 3 << 2 << TAG_SHIFT).to_le_bytes());
        buf.extend_from_slice(&0u32.to_le_bytes());
        let mut r = FrameReader::new(&buf[..]);
        let tagged = r.next_frame().await?.context("first frame")?;
        assert_eq!(tagged.raw_len, 7);
        assert_eq!(tagged.codec_or(Codec::None), Codec::Zstd { level: 9 });
        let old = r.next_frame().await?.context("second frame")?;
        assert_eq!((old.codec, old.codec_or(Codec::Lz4)), (None, Codec::Lz4));
        assert!(r.next_frame().await.is_err());
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

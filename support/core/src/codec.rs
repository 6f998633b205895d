//! Block compression. Every block is compressed on its own so that any block can be decoded,
//! verified and resent independently.
//!
//! Invariant: all decompression goes through [`decode`], which refuses to produce more than the
//! frame's declared raw length and never more than [`crate::MAX_BLOCK_BYTES`]: a hostile or
//! corrupt frame cannot make a receiver allocate without bound.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Context};
use haul_proto as pb;

/// How blocks are compressed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    None,
    Zstd { level: i32 },
    Lz4,
}

/// The codec an operator asked for. `auto` resolves to zstd at a level that keeps up with
/// a gigabit link on one core; adaptive selection is on the roadmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodecChoice {
    Auto,
    Fixed(Codec),
}

pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

impl FromStr for CodecChoice {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        let lower = s.to_ascii_lowercase();
        let (name, level) = match lower.split_once(':') {
            Some((n, l)) => (n, Some(l)),
            None => (lower.as_str(), None),
        };
        let codec = match (name, level) {
            ("auto", None) => return Ok(CodecChoice::Auto),
            ("none", None) => Codec::None,
            ("lz4", None) => Codec::Lz4,
            ("zstd", None) => Codec::Zstd {
                level: DEFAULT_ZSTD_LEVEL,
            },
            ("zstd", Some(l)) => {
                let level: i32 = l
                    .parse()
                    .ok()
                    .filter(|l| (1..=19).contains(l))
                    .with_context(|| format!("zstd level {l:?} is not a number from 1 to 19"))?;
                Codec::Zstd { level }
            }
            _ => bail!("unknown codec {s:?}: use auto, zstd, zstd:LEVEL (1-19), lz4 or none"),
        };
        Ok(CodecChoice::Fixed(codec))
    }
}

impl CodecChoice {
    pub fn resolve(self) -> Codec {
        match self {
            CodecChoice::Auto => Codec::Zstd {
                level: DEFAULT_ZSTD_LEVEL,
            },
            CodecChoice::Fixed(c) => c,
        }
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Codec::None => f.write_str("none"),
            Codec::Zstd { level } => write!(f, "zstd:{level}"),
            Codec::Lz4 => f.write_str("lz4"),
        }
    }
}

impl Codec {
    pub fn to_wire(self) -> (pb::Codec, i32) {
        match self {
            Codec::None => (pb::Codec::None, 0),
            Codec::Zstd { level } => (pb::Codec::Zstd, level),
            Codec::Lz4 => (pb::Codec::Lz4, 0),
        }
    }

    pub fn from_wire(codec: i32, level: i32) -> anyhow::Result<Codec> {
        match pb::Codec::try_from(codec) {
            Ok(pb::Codec::None) => Ok(Codec::None),
            Ok(pb::Codec::Lz4) => Ok(Codec::Lz4),
            Ok(pb::Codec::Zstd) => Ok(Codec::Zstd {
                level: if level == 0 {
                    DEFAULT_ZSTD_LEVEL
                } else {
                    level
                },
            }),
            Err(_) => bail!("unknown codec number {codec} on the wire"),
        }
    }

    /// Compress one raw block.
    pub fn encode(self, raw: &[u8]) -> anyhow::Result<Vec<u8>> {
        match self {
            Codec::None => Ok(raw.to_vec()),
            Codec::Lz4 => Ok(lz4_flex::block::compress(raw)),
            Codec::Zstd { level } => {
                zstd::bulk::compress(raw, level).context("zstd compress block")
            }
        }
    }
}

/// Decompress one block whose frame declares `raw_len` bytes. The only decoder in haul.
pub fn decode(codec: Codec, payload: &[u8], raw_len: usize) -> anyhow::Result<Vec<u8>> {
    if raw_len > crate::MAX_BLOCK_BYTES {
        bail!(
            "block declares {raw_len} raw bytes, more than the {} allowed",
            crate::MAX_BLOCK_BYTES
        );
    }
    let out = match codec {
        Codec::None => payload.to_vec(),
        Codec::Lz4 => lz4_flex::block::decompress(payload, raw_len).context("lz4 decode block")?,
        Codec::Zstd { .. } => {
            let mut d = zstd::bulk::Decompressor::new().context("create zstd decoder")?;
            d.decompress(payload, raw_len)
                .context("zstd decode block")?
        }
    };
    if out.len() != raw_len {
        bail!(
            "block decoded to {} bytes but its frame declared {raw_len}",
            out.len()
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect()
    }

    #[test]
    fn round_trips_every_codec() {
        let raw = sample();
        for codec in [Codec::None, Codec::Lz4, Codec::Zstd { level: 3 }] {
            let enc = codec.encode(&raw).expect("encode");
            let dec = decode(codec, &enc, raw.len()).expect("decode");
            assert_eq!(dec, raw, "{codec}");
        }
    }

    #[test]
    fn refuses_a_frame_that_lies_about_its_size() {
        let raw = sample();
        for codec in [Codec::None, Codec::Lz4, Codec::Zstd { level: 3 }] {
            let enc = codec.encode(&raw).expect("encode");
            assert!(decode(codec, &enc, raw.len() - 1).is_err(), "{codec} short");
            assert!(
                decode(codec, &enc, crate::MAX_BLOCK_BYTES + 1).is_err(),
                "{codec} huge"
            );
        }
    }

    #[test]
    fn refuses_garbage() {
        assert!(decode(Codec::Zstd { level: 3 }, b"not zstd at all", 100).is_err());
        assert!(decode(Codec::Lz4, &[0xff; 16], 100).is_err());
    }

    #[test]
    fn parses_choices() {
        let table = [
            ("auto", Some(CodecChoice::Auto)),
            ("zstd", Some(CodecChoice::Fixed(Codec::Zstd { level: 3 }))),
            ("ZSTD:9", Some(CodecChoice::Fixed(Codec::Zstd { level: 9 }))),
            ("lz4", Some(CodecChoice::Fixed(Codec::Lz4))),
            ("none", Some(CodecChoice::Fixed(Codec::None))),
            ("zstd:0", None),
            ("zstd:x", None),
            ("gzip", None),
        ];
        for (input, want) in table {
            assert_eq!(input.parse::<CodecChoice>().ok(), want, "{input}");
        }
    }
}

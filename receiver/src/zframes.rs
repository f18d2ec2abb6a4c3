//! Follows the frame structure of a zstd stream as its bytes go by, without decoding it, so
//! the receiver can refuse what libzstd would silently step over (SPEC §16): a skippable frame
//! carries bytes that are neither part of the tar nor covered by its SHA-256.
//!
//! Only the framing is read: the magic number, the frame header and each block's 3-byte header.
//! Block contents are skipped by count. Decoding errors stay libzstd's to report, except a
//! window larger than the receiver decodes, which is refused here before any memory is leased
//! for it. The frame header also tells how much memory a decoder will need for the frame
//! ([`FrameScanner::decoder_bytes`]), so the upload can lease it first (`crate::decoders`).

/// Magic number of an ordinary zstd frame (little endian on the wire).
const ZSTD_MAGIC: u32 = 0xFD2F_B528;
/// Skippable frames use 0x184D2A50..=0x184D2A5F.
const SKIPPABLE_MASK: u32 = 0xFFFF_FFF0;
const SKIPPABLE_BASE: u32 = 0x184D_2A50;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Collecting the 4-byte magic of the next frame.
    Magic,
    /// Collecting the frame header descriptor byte.
    Descriptor,
    /// Collecting the rest of the frame header (window, dictionary id, content size).
    HeaderRest,
    /// Collecting a 3-byte block header.
    BlockHeader,
    /// Skipping a block's content.
    BlockBody,
    /// Skipping the 4-byte content checksum after the last block.
    Checksum,
}

/// A refusal the scanner found in the framing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    Skippable { offset: u64 },
    BadMagic { offset: u64, magic: u32 },
    ReservedBlock { offset: u64 },
    WindowTooLarge { offset: u64, window: u64 },
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Skippable { offset } => write!(
                f,
                "body holds a zstd skippable frame at byte {offset}; its bytes are outside the tar and its SHA-256"
            ),
            FrameError::BadMagic { offset, magic } => write!(
                f,
                "body is not a valid zstd stream: bytes {offset}.. start with 0x{magic:08x}, not a zstd frame"
            ),
            FrameError::ReservedBlock { offset } => write!(
                f,
                "body is not a valid zstd stream: block at byte {offset} has the reserved type"
            ),
            FrameError::WindowTooLarge { offset, window } => write!(
                f,
                "the zstd frame at byte {offset} needs a {window}-byte window; the receiver decodes windows up to {} bytes (zstd --long or levels 20-22 without a window limit)",
                1u64 << crate::ingest::WINDOW_LOG_MAX
            ),
        }
    }
}

/// Streaming frame walker; feed it every compressed byte in order.
#[derive(Debug)]
pub struct FrameScanner {
    state: State,
    /// Bytes collected for the field being read (magic, descriptor, block header).
    acc: [u8; 4],
    have: usize,
    /// Bytes still to skip in `BlockBody` or `Checksum`, or to collect in `HeaderRest`.
    skip: u64,
    /// The frame header after its descriptor byte (at most 1 + 4 + 8 bytes).
    header: [u8; 13],
    header_len: usize,
    descriptor: u8,
    frame_start: u64,
    last_block: bool,
    checksum: bool,
    offset: u64,
    field_start: u64,
    /// Ordinary frames seen so far.
    pub frames: u64,
    /// The most decoder memory any frame so far needs (`crate::decoders::decoder_bytes`).
    pub decoder_bytes: u64,
}

impl Default for FrameScanner {
    fn default() -> Self {
        FrameScanner {
            state: State::Magic,
            acc: [0; 4],
            have: 0,
            skip: 0,
            header: [0; 13],
            header_len: 0,
            descriptor: 0,
            frame_start: 0,
            last_block: false,
            checksum: false,
            offset: 0,
            field_start: 0,
            frames: 0,
            decoder_bytes: 0,
        }
    }
}

impl FrameScanner {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the next bytes of the stream.
    pub fn feed(&mut self, mut buf: &[u8]) -> Result<(), FrameError> {
        while !buf.is_empty() {
            match self.state {
                State::HeaderRest => {
                    let n = (buf.len() as u64).min(self.skip) as usize;
                    self.header[self.header_len..self.header_len + n].copy_from_slice(&buf[..n]);
                    self.header_len += n;
                    self.skip -= n as u64;
                    self.offset += n as u64;
                    buf = &buf[n..];
                    if self.skip == 0 {
                        self.header_done()?;
                        self.after_skip();
                    }
                }
                State::BlockBody | State::Checksum => {
                    let n = (buf.len() as u64).min(self.skip) as usize;
                    self.skip -= n as u64;
                    self.offset += n as u64;
                    buf = &buf[n..];
                    if self.skip == 0 {
                        self.after_skip();
                    }
                }
                State::Magic | State::Descriptor | State::BlockHeader => {
                    if self.have == 0 {
                        self.field_start = self.offset;
                    }
                    let want = match self.state {
                        State::Magic => 4,
                        State::Descriptor => 1,
                        _ => 3,
                    };
                    let n = (want - self.have).min(buf.len());
                    self.acc[self.have..self.have + n].copy_from_slice(&buf[..n]);
                    self.have += n;
                    self.offset += n as u64;
                    buf = &buf[n..];
                    if self.have == want {
                        self.have = 0;
                        self.field_done()?;
                    }
                }
            }
        }
        Ok(())
    }

    /// True at a frame boundary (nothing of a frame is pending).
    pub fn at_boundary(&self) -> bool {
        self.state == State::Magic && self.have == 0
    }

    fn after_skip(&mut self) {
        self.state = match self.state {
            State::HeaderRest => State::BlockHeader,
            State::BlockBody if self.last_block && self.checksum => {
                self.skip = 4;
                State::Checksum
            }
            State::BlockBody if self.last_block => State::Magic,
            State::BlockBody => State::BlockHeader,
            _ => State::Magic,
        };
    }

    /// The frame header is complete: its window and content size give the decoder's memory.
    fn header_done(&mut self) -> Result<(), FrameError> {
        let d = self.descriptor;
        let single_segment = d & 0x20 != 0;
        let h = &self.header[..self.header_len];
        let (window_field, rest) = if single_segment {
            (None, h)
        } else {
            (h.first().copied(), h.get(1..).unwrap_or(&[]))
        };
        let dict_len = [0usize, 1, 2, 4][(d & 0x03) as usize];
        let fcs_bytes = rest.get(dict_len..).unwrap_or(&[]);
        let mut le = [0u8; 8];
        le[..fcs_bytes.len()].copy_from_slice(fcs_bytes);
        let content = match fcs_bytes.len() {
            0 => None,
            2 => Some(u64::from_le_bytes(le) + 256),
            _ => Some(u64::from_le_bytes(le)),
        };
        let window = match window_field {
            Some(b) => {
                let base = 1u64 << (10 + u32::from(b >> 3));
                base + (base / 8) * u64::from(b & 7)
            }
            // A single-segment frame's window is its content.
            None => content.unwrap_or(0),
        };
        if window > 1u64 << crate::ingest::WINDOW_LOG_MAX {
            return Err(FrameError::WindowTooLarge {
                offset: self.frame_start,
                window,
            });
        }
        let need = crate::decoders::decoder_bytes(window, content);
        self.decoder_bytes = self.decoder_bytes.max(need);
        Ok(())
    }

    fn field_done(&mut self) -> Result<(), FrameError> {
        match self.state {
            State::Magic => {
                let magic = u32::from_le_bytes(self.acc);
                if magic & SKIPPABLE_MASK == SKIPPABLE_BASE {
                    return Err(FrameError::Skippable {
                        offset: self.field_start,
                    });
                }
                if magic != ZSTD_MAGIC {
                    return Err(FrameError::BadMagic {
                        offset: self.field_start,
                        magic,
                    });
                }
                self.frames += 1;
                self.frame_start = self.field_start;
                self.state = State::Descriptor;
            }
            State::Descriptor => {
                let d = self.acc[0];
                let fcs_flag = d >> 6;
                let single_segment = d & 0x20 != 0;
                self.checksum = d & 0x04 != 0;
                let dict = [0u64, 1, 2, 4][(d & 0x03) as usize];
                let window = if single_segment { 0 } else { 1 };
                let fcs = match fcs_flag {
                    0 if single_segment => 1,
                    0 => 0,
                    1 => 2,
                    2 => 4,
                    _ => 8,
                };
                self.skip = window + dict + fcs;
                self.descriptor = d;
                self.header_len = 0;
                self.state = State::HeaderRest;
                if self.skip == 0 {
                    self.header_done()?;
                    self.after_skip();
                }
            }
            State::BlockHeader => {
                let h = u32::from_le_bytes([self.acc[0], self.acc[1], self.acc[2], 0]);
                self.last_block = h & 1 != 0;
                let kind = (h >> 1) & 3;
                let size = u64::from(h >> 3);
                self.skip = match kind {
                    0 | 2 => size,
                    1 => 1,
                    _ => {
                        return Err(FrameError::ReservedBlock {
                            offset: self.field_start,
                        })
                    }
                };
                self.state = State::BlockBody;
                if self.skip == 0 {
                    self.after_skip();
                }
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn skippable(payload: &[u8]) -> Vec<u8> {
        let mut f = (SKIPPABLE_BASE | 7).to_le_bytes().to_vec();
        f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn scan_in_pieces(stream: &[u8], piece: usize) -> Result<FrameScanner, FrameError> {
        let mut s = FrameScanner::new();
        for c in stream.chunks(piece.max(1)) {
            s.feed(c)?;
        }
        Ok(s)
    }

    #[test]
    fn ordinary_frames_pass_in_any_piece_size() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut stream = zstd::encode_all(&data[..], 3).unwrap();
        stream.extend(zstd::encode_all(&b"second frame"[..], 19).unwrap());
        stream.extend(zstd::encode_all(&[][..], 1).unwrap());
        // A frame with a checksum and no content size.
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 1).unwrap();
        enc.include_checksum(true).unwrap();
        enc.include_contentsize(false).unwrap();
        std::io::Write::write_all(&mut enc, &data[..1000]).unwrap();
        stream.extend(enc.finish().unwrap());
        for piece in [1, 3, 7, 512, 1 << 20] {
            let s = scan_in_pieces(&stream, piece).unwrap();
            assert!(s.at_boundary(), "piece {piece}");
            assert_eq!(s.frames, 4);
        }
    }

    #[test]
    fn a_skippable_frame_anywhere_is_refused() {
        let a = zstd::encode_all(&b"first"[..], 3).unwrap();
        let b = zstd::encode_all(&b"second"[..], 3).unwrap();
        for at in 0..3 {
            let mut stream = Vec::new();
            if at == 0 {
                stream.extend(skippable(b"hidden"));
            }
            stream.extend(&a);
            if at == 1 {
                stream.extend(skippable(b"hidden"));
            }
            stream.extend(&b);
            if at == 2 {
                stream.extend(skippable(b""));
            }
            let err = scan_in_pieces(&stream, 5).unwrap_err();
            let want = [0, a.len(), a.len() + b.len()][at] as u64;
            assert_eq!(err, FrameError::Skippable { offset: want });
            assert!(err.to_string().contains("skippable"));
        }
    }

    fn encode(data: &[u8], window_log: u32) -> Vec<u8> {
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        enc.window_log(window_log).unwrap();
        enc.long_distance_matching(true).unwrap();
        std::io::Write::write_all(&mut enc, data).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn the_decoder_memory_follows_the_largest_window() {
        use crate::decoders::decoder_bytes;
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        // One-shot compression of a small input: a single-segment frame, sized by its content.
        let one = zstd::bulk::compress(&data[..1000], 3).unwrap();
        let s = scan_in_pieces(&one, 1).unwrap();
        assert_eq!(s.decoder_bytes, decoder_bytes(1000, Some(1000)));
        // Streaming without a content size: the declared window.
        let mut stream = encode(&data, 20);
        let s = scan_in_pieces(&stream, 3).unwrap();
        assert_eq!(s.decoder_bytes, decoder_bytes(1 << 20, None));
        // A later frame with a larger window raises it; a smaller one does not lower it.
        stream.extend(encode(&data, 22));
        stream.extend(one);
        let s = scan_in_pieces(&stream, 7).unwrap();
        assert_eq!(s.decoder_bytes, decoder_bytes(4 << 20, None));
        assert_eq!(s.frames, 3);
    }

    #[test]
    fn a_window_beyond_the_receivers_limit_is_refused_at_its_header() {
        let data = vec![7u8; 5000];
        let mut stream = encode(&data, 20);
        let at = stream.len() as u64;
        stream.extend(encode(&data, crate::ingest::WINDOW_LOG_MAX + 1));
        let err = scan_in_pieces(&stream, 4).unwrap_err();
        assert_eq!(
            err,
            FrameError::WindowTooLarge {
                offset: at,
                window: 1 << (crate::ingest::WINDOW_LOG_MAX + 1)
            }
        );
        assert!(
            err.to_string().contains("windows up to 16777216 bytes"),
            "{err}"
        );
        // The largest window the receiver decodes passes.
        scan_in_pieces(&encode(&data, crate::ingest::WINDOW_LOG_MAX), 4).unwrap();
    }

    #[test]
    fn garbage_between_frames_is_not_a_frame() {
        let mut stream = zstd::encode_all(&b"x"[..], 3).unwrap();
        let at = stream.len() as u64;
        stream.extend(b"junkjunk");
        match scan_in_pieces(&stream, 2).unwrap_err() {
            FrameError::BadMagic { offset, .. } => assert_eq!(offset, at),
            other => panic!("{other:?}"),
        }
    }
}

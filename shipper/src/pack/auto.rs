//! `compression = "auto"`: the tar stream goes through zstd at `zstd_level`, except long
//! stretches whose sample looks incompressible, which are stored as frames of raw blocks. Only
//! the compressed body changes; the tar bytes (and so their SHA-256) are the same in every mode.

use std::io::{self, Write};

use zstd::zstd_safe::{zstd_sys::ZSTD_EndDirective, CCtx, InBuffer, OutBuffer};

use super::zstd_error;

/// Bytes judged at the head of every stretch.
pub const SAMPLE: usize = 64 << 10;

/// A large member is judged again every `BLOCK` bytes, so a sample that lies (a compressible
/// head on a random tail, or the reverse) costs at most one block at the wrong setting.
pub const BLOCK: u64 = 1 << 20;

/// A stretch is only stored if at least this long: shorter ones keep the current setting, so
/// a body has at most one frame more than two per `MIN_STORED_STRETCH` bytes of tar.
pub const MIN_STORED_STRETCH: u64 = 128 << 10;

/// Order-0 entropy (bits per byte) from which a sample counts as incompressible. Random and
/// already-compressed data measure 7.99+ over 64 KiB (7.9 with three tar header blocks in the
/// sample); CSV and JSON text measure 4-5.
pub const ENTROPY_LIMIT: f64 = 7.8;

/// Largest raw block (zstd's block maximum).
const RAW_BLOCK: usize = 128 << 10;

/// A frame of raw blocks: the magic, a descriptor with no content size, no checksum and no
/// dictionary, and a 128 KiB window (the least that allows 128 KiB blocks).
const RAW_FRAME_HEADER: [u8; 6] = [0x28, 0xB5, 0x2F, 0xFD, 0x00, 7 << 3];

/// Bits per byte of `sample`'s byte histogram.
pub fn entropy(sample: &[u8]) -> f64 {
    if sample.is_empty() {
        return 0.0;
    }
    let mut counts = [0u32; 256];
    for &b in sample {
        counts[b as usize] += 1;
    }
    let n = sample.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum()
}

/// What a run of [`AutoEncoder`] did (for tests and the benchmark).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Switches {
    /// Changes between zstd and stored.
    pub switches: u64,
    /// Bytes of tar stored raw.
    pub stored_bytes: u64,
}

/// A zstd writer that stores long incompressible stretches of its input raw.
pub struct AutoEncoder<'c, W: Write> {
    /// Carries `zstd_level` and the workers; never re-parameterised here.
    ctx: &'c mut CCtx<'static>,
    out: W,
    /// zstd's output on its way to `out`.
    buf: Vec<u8>,
    /// A frame of raw blocks is open (the current stretch is stored).
    storing: bool,
    /// The raw block being filled.
    raw: Vec<u8>,
    /// Bytes given to zstd since its current frame began.
    in_frame: u64,
    /// Head of the current stretch, held back until judged.
    sample: Vec<u8>,
    /// Bytes `sample` is to hold before it is judged; 0 while streaming.
    sample_want: usize,
    /// Bytes of the current stretch still to come (sample included).
    stretch_left: u64,
    /// Bytes of the current member (header included) still to come.
    member_left: u64,
    stats: Switches,
}

impl<'c, W: Write> AutoEncoder<'c, W> {
    pub fn new(ctx: &'c mut CCtx<'static>, out: W) -> Self {
        AutoEncoder {
            ctx,
            out,
            buf: Vec::with_capacity(CCtx::out_size()),
            storing: false,
            raw: Vec::new(),
            in_frame: 0,
            sample: Vec::new(),
            sample_want: 0,
            stretch_left: 0,
            member_left: 0,
            stats: Switches::default(),
        }
    }

    /// The next `len` bytes written (a member's header and data) are one file: judge them apart
    /// from what came before.
    pub fn member(&mut self, len: u64) -> io::Result<()> {
        self.judge_pending()?;
        self.member_left = len;
        self.begin_stretch();
        Ok(())
    }

    fn begin_stretch(&mut self) {
        let stretch = self.member_left.min(BLOCK);
        self.stretch_left = stretch;
        // Below a quarter of a sample the estimate means little and the stretch is too short
        // to switch for: stream it at the current setting.
        let want = stretch.min(SAMPLE as u64) as usize;
        self.sample_want = if want >= SAMPLE / 4 { want } else { 0 };
    }

    /// Judges the held sample, switches if needed, and passes the sample on.
    fn judge_pending(&mut self) -> io::Result<()> {
        if self.sample_want == 0 {
            return Ok(());
        }
        self.sample_want = 0;
        let stretch = self.sample.len() as u64 + self.stretch_left;
        let store = if self.sample.len() < SAMPLE / 4 {
            // Cut short (the member ended early): too little to judge, keep the setting.
            self.storing
        } else if entropy(&self.sample) >= ENTROPY_LIMIT {
            self.storing || stretch >= MIN_STORED_STRETCH
        } else {
            false
        };
        if store != self.storing {
            self.switch(store)?;
        }
        let sample = std::mem::take(&mut self.sample);
        let r = self.feed(&sample);
        self.sample = sample;
        self.sample.clear();
        r
    }

    fn switch(&mut self, store: bool) -> io::Result<()> {
        self.stats.switches += 1;
        if store {
            self.end_zstd_frame()?;
            self.out.write_all(&RAW_FRAME_HEADER)?;
            self.storing = true;
        } else {
            self.end_raw_frame()?;
        }
        Ok(())
    }

    fn end_zstd_frame(&mut self) -> io::Result<()> {
        if self.in_frame > 0 {
            self.drive(&[], ZSTD_EndDirective::ZSTD_e_end)?;
            self.in_frame = 0;
        }
        Ok(())
    }

    /// Writes the held bytes as a raw block, the frame's last if `last`.
    fn raw_block(&mut self, last: bool) -> io::Result<()> {
        // 3 bytes, little endian: size << 3 | type (0, raw) << 1 | last.
        let header = (self.raw.len() as u32) << 3 | u32::from(last);
        self.out.write_all(&header.to_le_bytes()[..3])?;
        self.out.write_all(&self.raw)?;
        self.raw.clear();
        Ok(())
    }

    fn end_raw_frame(&mut self) -> io::Result<()> {
        if self.storing {
            self.raw_block(true)?;
            self.storing = false;
        }
        Ok(())
    }

    fn feed(&mut self, mut data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        if self.storing {
            self.stats.stored_bytes += data.len() as u64;
            while !data.is_empty() {
                let n = (RAW_BLOCK - self.raw.len()).min(data.len());
                self.raw.extend_from_slice(&data[..n]);
                data = &data[n..];
                if self.raw.len() == RAW_BLOCK {
                    self.raw_block(false)?;
                }
            }
            return Ok(());
        }
        self.in_frame += data.len() as u64;
        self.drive(data, ZSTD_EndDirective::ZSTD_e_continue)
    }

    /// Runs zstd over `data` with `op` until the input is taken and, for an end, the frame is
    /// written out.
    fn drive(&mut self, data: &[u8], op: ZSTD_EndDirective) -> io::Result<()> {
        let mut input = InBuffer::around(data);
        loop {
            self.buf.clear();
            let mut output = OutBuffer::around(&mut self.buf);
            let left = self
                .ctx
                .compress_stream2(&mut output, &mut input, op)
                .map_err(zstd_error)?;
            let made = output.pos();
            self.out.write_all(&self.buf[..made])?;
            let taken = input.pos() == data.len();
            let done = match op {
                ZSTD_EndDirective::ZSTD_e_continue => taken,
                _ => taken && left == 0,
            };
            if done {
                return Ok(());
            }
        }
    }

    /// Ends the last frame; gives back the writer and what was done.
    pub fn finish(mut self) -> io::Result<(W, Switches)> {
        self.judge_pending()?;
        if self.storing {
            // The archive ended in a stored stretch: no zstd frame is open.
            self.end_raw_frame()?;
        } else if self.in_frame > 0 || self.stats.switches == 0 {
            // (An empty input still makes one, empty, frame.)
            self.drive(&[], ZSTD_EndDirective::ZSTD_e_end)?;
        }
        Ok((self.out, self.stats))
    }

    fn take(&mut self, n: u64) {
        self.stretch_left = self.stretch_left.saturating_sub(n);
        self.member_left = self.member_left.saturating_sub(n);
    }

    fn next_stretch_if_due(&mut self) {
        if self.stretch_left == 0 && self.sample_want == 0 && self.member_left > 0 {
            self.begin_stretch();
        }
    }
}

impl<W: Write> Write for AutoEncoder<'_, W> {
    fn write(&mut self, mut data: &[u8]) -> io::Result<usize> {
        let given = data.len();
        while !data.is_empty() {
            if self.sample_want > 0 {
                let n = (self.sample_want - self.sample.len()).min(data.len());
                self.sample.extend_from_slice(&data[..n]);
                data = &data[n..];
                self.take(n as u64);
                if self.sample.len() == self.sample_want {
                    self.judge_pending()?;
                    self.next_stretch_if_due();
                }
            } else {
                // Up to the end of the stretch, then judge the next one.
                let n = if self.stretch_left > 0 {
                    self.stretch_left.min(data.len() as u64) as usize
                } else {
                    data.len()
                };
                self.feed(&data[..n])?;
                data = &data[n..];
                self.take(n as u64);
                self.next_stretch_if_due();
            }
        }
        Ok(given)
    }

    /// Writes out what is already made; ends no block (that would change the body).
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

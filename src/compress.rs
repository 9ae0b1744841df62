//! zstd for file bodies, an extension between our client and our server (option `zstd` of a
//! checked header, docs/PROTOCOL.md §9): the body of a transfer is then one zstd frame of
//! the file's bytes from the transfer's first byte on. The receiver decodes it as it
//! arrives, so the saved copy, the hash and every lab client see only the original bytes.
//!
//! A frame ends itself: the receiver knows where the body stops (and its trailer starts)
//! from the frame, not from a length. Its window is capped at [`WINDOW_LOG`] on both sides,
//! so a hostile frame cannot make the receiver hold more than about a megabyte.

use std::io;

use zstd::stream::raw::{CParameter, DParameter, Decoder, Encoder, InBuffer, Operation, OutBuffer};

/// zstd's fastest standard level: it pays on a network of tens of MB/s and up, where a
/// higher level would make the sender's CPU the limit.
const LEVEL: i32 = 1;
/// The largest window (2^20 = 1 MiB) either side uses or accepts.
const WINDOW_LOG: u32 = 20;
/// How much of a file [`pays`] compresses to judge it.
pub const SAMPLE_BYTES: usize = 128 * 1024;
/// Files smaller than this are sent as they are: too small to be worth it.
const MIN_BYTES: u64 = 4096;

/// Whether compressing a file of `size` bytes whose first bytes are `sample` pays: it
/// shrinks them to 90% or less.
pub fn pays(size: u64, sample: &[u8]) -> bool {
    if size < MIN_BYTES || sample.is_empty() {
        return false;
    }
    match zstd::bulk::compress(sample, LEVEL) {
        Ok(packed) => packed.len() * 10 <= sample.len() * 9,
        Err(_) => false,
    }
}

/// The sending side: compresses a body as it is read.
pub struct Deflate(Encoder<'static>);

impl Deflate {
    /// An encoder at zstd's level 1 with a window of at most 1 MiB.
    pub fn new() -> io::Result<Self> {
        let mut encoder = Encoder::new(LEVEL)?;
        encoder.set_parameter(CParameter::WindowLog(WINDOW_LOG))?;
        // BLAKE3 checks the whole transfer: no second checksum.
        encoder.set_parameter(CParameter::ChecksumFlag(false))?;
        Ok(Self(encoder))
    }

    /// Compresses `input`, appending to `out` whatever the encoder has ready.
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        let mut input = InBuffer::around(input);
        while input.pos() < input.src.len() {
            out.reserve(zstd::zstd_safe::CCtx::out_size());
            let len = out.len();
            let mut output = OutBuffer::around_pos(out, len);
            self.0.run(&mut input, &mut output)?;
        }
        Ok(())
    }

    /// Appends to `out` everything given so far (ending the current block): for a sender
    /// that has caught up with its source and would otherwise hold bytes back.
    pub fn flush(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        loop {
            out.reserve(zstd::zstd_safe::CCtx::out_size());
            let len = out.len();
            let mut output = OutBuffer::around_pos(out, len);
            if self.0.flush(&mut output)? == 0 {
                return Ok(());
            }
        }
    }

    /// Ends the frame, appending its last bytes to `out`.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        loop {
            out.reserve(zstd::zstd_safe::CCtx::out_size());
            let len = out.len();
            let mut output = OutBuffer::around_pos(out, len);
            if self.0.finish(&mut output, true)? == 0 {
                return Ok(());
            }
        }
    }
}

/// The receiving side: decodes a body as it arrives.
pub struct Inflate {
    decoder: Decoder<'static>,
    /// The frame is over: nothing more belongs to the body.
    ended: bool,
}

/// What one [`Inflate::pull`] did.
#[derive(Debug, PartialEq, Eq)]
pub struct Pulled {
    /// Input bytes used (the rest, if the frame ended, is not the body's).
    pub read: usize,
    /// Whether the frame ended (with everything decoded in `out`).
    pub ended: bool,
}

impl Inflate {
    /// A decoder that refuses frames whose window is past 1 MiB.
    pub fn new() -> io::Result<Self> {
        let mut decoder = Decoder::new()?;
        decoder.set_parameter(DParameter::WindowLogMax(WINDOW_LOG))?;
        Ok(Self {
            decoder,
            ended: false,
        })
    }

    /// Decodes from `input` into `out`'s spare capacity (at least one byte of it), up to
    /// its capacity or the end of the frame, whichever comes first.
    pub fn pull(&mut self, input: &[u8], out: &mut Vec<u8>) -> io::Result<Pulled> {
        if self.ended {
            return Ok(Pulled {
                read: 0,
                ended: true,
            });
        }
        let mut input = InBuffer::around(input);
        let len = out.len();
        let mut output = OutBuffer::around_pos(out, len);
        let hint = self.decoder.run(&mut input, &mut output).map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidData, format!("bad zstd body: {e}"))
        })?;
        // 0: the frame is complete and all of it is in `out`.
        self.ended = hint == 0;
        Ok(Pulled {
            read: input.pos(),
            ended: self.ended,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deflate(data: &[u8], piece: usize) -> Vec<u8> {
        let mut d = Deflate::new().expect("encoder");
        let mut out = Vec::new();
        for chunk in data.chunks(piece) {
            d.push(chunk, &mut out).expect("push");
        }
        d.finish(&mut out).expect("finish");
        out
    }

    /// Decodes `frame` fed `piece` bytes at a time into outputs of `room` bytes; returns
    /// the bytes and how much input was left after the frame.
    fn inflate(frame: &[u8], piece: usize, room: usize) -> (Vec<u8>, usize) {
        let mut inf = Inflate::new().expect("decoder");
        let mut got = Vec::new();
        let mut at = 0;
        loop {
            let end = (at + piece).min(frame.len());
            let mut out = Vec::with_capacity(room);
            let pulled = inf.pull(&frame[at..end], &mut out).expect("pull");
            got.extend_from_slice(&out);
            at += pulled.read;
            if pulled.ended {
                return (got, frame.len() - at);
            }
            assert!(at < frame.len() || !out.is_empty(), "stuck");
        }
    }

    #[test]
    fn text_round_trips_in_any_pieces_and_the_frame_ends_itself() {
        let text: Vec<u8> = (0..200_000)
            .flat_map(|i| format!("line {i} of the chat log\n").into_bytes())
            .collect();
        let frame = deflate(&text, 70_000);
        assert!(frame.len() * 10 < text.len(), "text compresses well");
        let mut framed = frame.clone();
        framed.extend_from_slice(b"b3 trailer\n");
        for (piece, room) in [(1 << 20, 1 << 18), (1000, 777), (7, 1 << 16)] {
            let (got, left) = inflate(&framed, piece, room);
            assert_eq!(got, text);
            assert_eq!(left, b"b3 trailer\n".len(), "the trailer is not the body's");
        }
        assert!(pays(text.len() as u64, &text[..SAMPLE_BYTES]));
    }

    #[test]
    fn random_bytes_do_not_pay_and_small_files_are_left_alone() {
        let mut random = vec![0u8; SAMPLE_BYTES];
        getrandom::getrandom(&mut random).expect("random");
        assert!(!pays(1 << 30, &random));
        assert!(!pays(100, &[b'a'; 100]));
        assert!(pays(1 << 20, &[b'a'; 8192]));
    }

    #[test]
    fn a_frame_with_a_window_past_the_cap_or_garbage_is_refused() {
        let mut big = Encoder::new(LEVEL).expect("encoder");
        big.set_parameter(CParameter::WindowLog(WINDOW_LOG + 4))
            .expect("window");
        // A frame header that announces the bigger window (from a large input).
        let data = vec![7u8; 1 << 22];
        let mut frame = vec![0u8; zstd::zstd_safe::compress_bound(data.len())];
        let n = {
            let mut input = InBuffer::around(&data[..]);
            let mut output = OutBuffer::around(&mut frame[..]);
            big.run(&mut input, &mut output).expect("run");
            while big.finish(&mut output, true).expect("finish") != 0 {}
            output.pos()
        };
        let mut inf = Inflate::new().expect("decoder");
        let mut out = Vec::with_capacity(1 << 16);
        assert!(inf.pull(&frame[..n], &mut out).is_err());
        let mut inf = Inflate::new().expect("decoder");
        assert!(inf.pull(b"this is not zstd at all", &mut out).is_err());
    }
}

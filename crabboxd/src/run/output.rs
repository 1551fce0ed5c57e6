//! A run's output on its way to the coordinator: cut into 16 KiB events on
//! UTF-8 boundaries, capped at 64 KiB per run then one `output.truncated`
//! (the reference's numbers), and the retained log tail (8 MiB) sent with
//! `finish` in 64 KiB chunks.

use std::collections::VecDeque;

use crate::coordinator::EventInput;

/// One output event's data, at most.
pub const CHUNK: usize = 16 << 10;
/// Output event data per run, stdout and stderr together, at most.
pub const EVENT_CAP: usize = 64 << 10;
/// The log tail kept for `finish`.
pub const LOG_CAP: usize = 8 << 20;
/// One `logChunks` entry, at most.
pub const LOG_CHUNK: usize = 64 << 10;

/// The message of the one `output.truncated` event (the reference's text).
pub const TRUNCATED: &str = "stdout/stderr event capture capped at 65536 bytes; use crabbox logs for retained command output";

/// Which stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// stdout.
    Stdout,
    /// stderr.
    Stderr,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// The longest prefix of `buf` of at most `max` bytes that does not end
/// inside a UTF-8 character (binary data is cut at `max`, at most three
/// bytes earlier).
pub fn utf8_cut(buf: &[u8], max: usize) -> usize {
    if buf.len() <= max {
        return buf.len();
    }
    let mut n = max;
    // Step back over continuation bytes to the start of the character that
    // straddles the cut, if it is a multi-byte one.
    for _ in 0..3 {
        if n == 0 || buf[n] & 0xC0 != 0x80 {
            break;
        }
        n -= 1;
    }
    if buf[n] & 0xC0 == 0x80 { max } else { n }
}

/// Turns output into run events.
#[derive(Debug, Default)]
pub struct Cutter {
    pending: [Vec<u8>; 2],
    sent: usize,
    truncated: bool,
}

impl Cutter {
    /// Whether the cap was reached.
    pub fn truncated(&self) -> bool {
        self.truncated
    }

    /// Whether bytes wait for [`Cutter::flush`].
    pub fn has_pending(&self) -> bool {
        self.pending.iter().any(|p| !p.is_empty())
    }

    /// Takes output; full chunks become events.
    pub fn push(&mut self, stream: Stream, data: &[u8], out: &mut Vec<EventInput>) {
        if self.truncated {
            return;
        }
        let i = stream as usize;
        self.pending[i].extend_from_slice(data);
        while self.pending[i].len() >= CHUNK && !self.truncated {
            let n = utf8_cut(&self.pending[i], CHUNK);
            let chunk: Vec<u8> = self.pending[i].drain(..n).collect();
            self.emit(stream, &chunk, out);
        }
        if self.truncated {
            self.pending = Default::default();
        }
    }

    /// Sends what is pending, e.g. when the output paused or ended. A
    /// character split across writes waits for its end (unless `last`).
    pub fn flush(&mut self, last: bool, out: &mut Vec<EventInput>) {
        for stream in [Stream::Stdout, Stream::Stderr] {
            let i = stream as usize;
            if self.pending[i].is_empty() || self.truncated {
                continue;
            }
            let mut buf = std::mem::take(&mut self.pending[i]);
            let keep = if last { 0 } else { incomplete_tail(&buf) };
            let rest = buf.split_off(buf.len() - keep);
            if !buf.is_empty() {
                self.emit(stream, &buf, out);
            }
            self.pending[i] = rest;
        }
    }

    fn emit(&mut self, stream: Stream, chunk: &[u8], out: &mut Vec<EventInput>) {
        let room = EVENT_CAP - self.sent;
        let n = if chunk.len() > room {
            utf8_cut(chunk, room)
        } else {
            chunk.len()
        };
        if n > 0 {
            self.sent += n;
            out.push(EventInput {
                kind: stream.name().into(),
                stream: Some(stream.name()),
                data: Some(String::from_utf8_lossy(&chunk[..n]).into_owned()),
                ..Default::default()
            });
        }
        if n < chunk.len() || self.sent >= EVENT_CAP {
            self.truncated = true;
            out.push(EventInput {
                kind: "output.truncated".into(),
                phase: Some("command".into()),
                message: Some(TRUNCATED.into()),
                ..Default::default()
            });
        }
    }
}

/// How many bytes at the end of `buf` start a UTF-8 character that is not
/// complete yet (0 for complete text or binary).
fn incomplete_tail(buf: &[u8]) -> usize {
    for back in 1..=3.min(buf.len()) {
        let b = buf[buf.len() - back];
        if b & 0xC0 == 0x80 {
            continue;
        }
        let need = match b {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => return 0,
        };
        return if need > back { back } else { 0 };
    }
    0
}

/// The last [`LOG_CAP`] bytes of a run's output, both streams in order.
#[derive(Debug, Default)]
pub struct LogTail {
    buf: VecDeque<u8>,
    total: u64,
}

impl LogTail {
    /// Appends output.
    pub fn push(&mut self, data: &[u8]) {
        self.total += data.len() as u64;
        self.buf.extend(data);
        if self.buf.len() > LOG_CAP {
            let extra = self.buf.len() - LOG_CAP;
            self.buf.drain(..extra);
        }
    }

    /// Every byte written.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// `(log, logChunks, logTruncated)` for `finish`: the last ≤ 64 KiB,
    /// the kept tail in UTF-8-safe 64 KiB chunks, and whether the tail lost
    /// the beginning.
    pub fn finish(&self) -> (String, Vec<String>, bool) {
        let bytes: Vec<u8> = self.buf.iter().copied().collect();
        // Start at a character boundary.
        let mut start = 0;
        while start < bytes.len().min(3) && bytes[start] & 0xC0 == 0x80 {
            start += 1;
        }
        let bytes = &bytes[start..];
        let mut chunks = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            let n = utf8_cut(rest, LOG_CHUNK).max(1);
            chunks.push(String::from_utf8_lossy(&rest[..n]).into_owned());
            rest = &rest[n..];
        }
        let mut from = bytes.len().saturating_sub(LOG_CHUNK);
        while from < bytes.len() && bytes[from] & 0xC0 == 0x80 {
            from += 1;
        }
        let log = String::from_utf8_lossy(&bytes[from..]).into_owned();
        (log, chunks, self.total > self.buf.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(out: &[EventInput]) -> String {
        out.iter().filter_map(|e| e.data.clone()).collect()
    }

    #[test]
    fn chunks_are_cut_on_character_boundaries() {
        // A 3-byte character straddles the 16 KiB boundary.
        let text = format!("{}€tail", "a".repeat(CHUNK - 1));
        let mut c = Cutter::default();
        let mut out = Vec::new();
        c.push(Stream::Stdout, text.as_bytes(), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].data.as_ref().unwrap().len(), CHUNK - 1);
        c.flush(true, &mut out);
        assert_eq!(data(&out), text);
        assert!(!c.truncated());
    }

    #[test]
    fn a_character_split_across_writes_waits_for_its_end() {
        let mut c = Cutter::default();
        let mut out = Vec::new();
        let euro = "€".as_bytes();
        c.push(Stream::Stderr, &[b'x', euro[0]], &mut out);
        c.flush(false, &mut out);
        c.push(Stream::Stderr, &euro[1..], &mut out);
        c.flush(false, &mut out);
        assert_eq!(data(&out), "x€");
        assert!(out.iter().all(|e| e.stream == Some("stderr")));
    }

    #[test]
    fn the_cap_cuts_output_then_one_truncated_event() {
        let mut c = Cutter::default();
        let mut out = Vec::new();
        for _ in 0..100 {
            c.push(Stream::Stdout, &[b'z'; 10_000], &mut out);
            c.flush(false, &mut out);
        }
        assert_eq!(data(&out).len(), EVENT_CAP);
        let truncated: Vec<_> = out
            .iter()
            .filter(|e| e.kind == "output.truncated")
            .collect();
        assert_eq!(truncated.len(), 1);
        assert_eq!(out.last().unwrap().kind, "output.truncated");
        assert!(
            out.iter()
                .all(|e| e.data.as_ref().is_none_or(|d| d.len() <= CHUNK))
        );
    }

    #[test]
    fn the_log_tail_keeps_the_end_in_safe_chunks() {
        let mut t = LogTail::default();
        let line = "ü".repeat(1000);
        for _ in 0..5000 {
            t.push(line.as_bytes());
        }
        let (log, chunks, truncated) = t.finish();
        assert!(truncated);
        assert!(log.len() <= LOG_CHUNK && log.len() > LOG_CHUNK - 4);
        assert!(
            chunks
                .iter()
                .all(|c| c.len() <= LOG_CHUNK && !c.contains('\u{fffd}'))
        );
        assert!(chunks.concat().len() <= LOG_CAP);
    }
}

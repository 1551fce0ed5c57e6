//! The chunked-body boundary scanner: finds where one chunked request body ends, without decoding it.

/// Finds where a chunked body ends without decoding it, so exactly one
/// request's body is forwarded and nothing after it.
#[derive(Debug, Clone, Default)]
pub struct ChunkedScanner {
    state: ChunkState,
    size: u64,
    digits: u8,
    line_len: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    Trailer,
    Done,
}

/// A chunked body the scanner cannot follow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed chunked request body")]
pub struct ChunkError;

impl ChunkedScanner {
    /// Creates a scanner at the start of a body.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the terminating chunk and trailers were seen.
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Consumes `data`; returns `Some(n)` when the body ends after its first `n` bytes.
    pub fn feed(&mut self, data: &[u8]) -> Result<Option<usize>, ChunkError> {
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            match self.state {
                ChunkState::Done => return Ok(Some(i)),
                ChunkState::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        self.digits += 1;
                        if self.digits > 15 {
                            return Err(ChunkError);
                        }
                        self.size = self.size * 16 + (b as char).to_digit(16).unwrap_or(0) as u64;
                    }
                    b';' | b' ' | b'\t' if self.digits > 0 => self.state = ChunkState::Ext,
                    b'\r' if self.digits > 0 => self.state = ChunkState::SizeLf,
                    _ => return Err(ChunkError),
                },
                ChunkState::Ext => match b {
                    b'\r' => self.state = ChunkState::SizeLf,
                    b'\n' => return Err(ChunkError),
                    _ => {}
                },
                ChunkState::SizeLf => {
                    if b != b'\n' {
                        return Err(ChunkError);
                    }
                    self.digits = 0;
                    if self.size == 0 {
                        self.state = ChunkState::Trailer;
                        self.line_len = 0;
                    } else {
                        self.state = ChunkState::Data;
                    }
                }
                ChunkState::Data => {
                    let take = (self.size as usize).min(data.len() - i);
                    self.size -= take as u64;
                    i += take;
                    if self.size == 0 {
                        self.state = ChunkState::DataCr;
                    }
                    continue;
                }
                ChunkState::DataCr => {
                    if b != b'\r' {
                        return Err(ChunkError);
                    }
                    self.state = ChunkState::DataLf;
                }
                ChunkState::DataLf => {
                    if b != b'\n' {
                        return Err(ChunkError);
                    }
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailer => match b {
                    b'\r' => {}
                    b'\n' if self.line_len == 0 => {
                        self.state = ChunkState::Done;
                        return Ok(Some(i + 1));
                    }
                    b'\n' => self.line_len = 0,
                    _ => {
                        self.line_len += 1;
                        if self.line_len > 8192 {
                            return Err(ChunkError);
                        }
                    }
                },
            }
            i += 1;
        }
        Ok(if self.state == ChunkState::Done {
            Some(i)
        } else {
            None
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_scanner_finds_the_end() {
        let body = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        for split in 0..body.len() {
            let mut s = ChunkedScanner::new();
            let first = s.feed(&body[..split]).unwrap();
            let end = match first {
                Some(n) => n,
                None => split + s.feed(&body[split..]).unwrap().unwrap(),
            };
            assert_eq!(&body[end..], b"NEXT", "split at {split}");
        }
        assert_eq!(ChunkedScanner::new().feed(b"zz\r\n"), Err(ChunkError));
    }
}

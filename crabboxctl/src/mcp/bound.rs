//! Keeping every MCP tool result within what an agent can hold: one byte
//! budget per result, measured as the JSON text it is sent as, and the
//! helpers that fit long output or long lists into it (a tail, a page with
//! a cursor).

use std::collections::VecDeque;

use serde_json::Value;

/// The most JSON text one tool result carries.
pub const RESULT_LIMIT: usize = 64 * 1024;

/// What the variable part of a result (output text, list items) may take,
/// leaving room for the fields around it.
pub const PAYLOAD_BUDGET: usize = 60 * 1024;

/// The length of `c` inside a JSON string literal, as serde_json escapes it.
fn json_char_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
        c if (c as u32) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

/// The length of `s` as a JSON string literal, quotes included.
pub fn json_str_len(s: &str) -> usize {
    2 + s.chars().map(json_char_len).sum::<usize>()
}

/// The length of `v` as compact JSON text.
pub fn json_len(v: &Value) -> usize {
    serde_json::to_string(v).map_or(usize::MAX, |s| s.len())
}

/// The longest suffix of `s` whose JSON string literal fits in `budget`
/// bytes, and how many bytes of `s` were left out before it.
pub fn tail(s: &str, budget: usize) -> (&str, usize) {
    let mut used = 2;
    let mut start = s.len();
    for (i, c) in s.char_indices().rev() {
        used += json_char_len(c);
        if used > budget {
            break;
        }
        start = i;
    }
    (&s[start..], start)
}

/// The longest prefix of `s` whose JSON string literal fits in `budget`
/// bytes, and how many bytes of `s` were left out after it.
pub fn head(s: &str, budget: usize) -> (&str, usize) {
    let mut used = 2;
    let mut end = 0;
    for (i, c) in s.char_indices() {
        used += json_char_len(c);
        if used > budget {
            break;
        }
        end = i + c.len_utf8();
    }
    (&s[..end], s.len() - end)
}

/// Splits `budget` between two texts of JSON lengths `a` and `b`: each gets
/// what it needs when both fit, else the shorter keeps its need up to half
/// and the longer gets the rest.
pub fn split_budget(a: usize, b: usize, budget: usize) -> (usize, usize) {
    let half = budget / 2;
    if a + b <= budget {
        (a, b)
    } else if a <= half {
        (a, budget - a)
    } else if b <= half {
        (budget - b, b)
    } else {
        (half, budget - half)
    }
}

/// The last bytes of a stream, at most `cap` of them, and how many came in
/// all: output that may be long kept in bounded memory.
#[derive(Debug)]
pub struct TailBuffer {
    cap: usize,
    bytes: VecDeque<u8>,
    total: u64,
}

impl TailBuffer {
    /// An empty buffer that keeps the last `cap` bytes.
    pub fn new(cap: usize) -> Self {
        TailBuffer {
            cap,
            bytes: VecDeque::new(),
            total: 0,
        }
    }

    /// Appends `data`, dropping the oldest bytes beyond the cap.
    pub fn push(&mut self, data: &[u8]) {
        self.total += data.len() as u64;
        let data = &data[data.len().saturating_sub(self.cap)..];
        let over = (self.bytes.len() + data.len()).saturating_sub(self.cap);
        self.bytes.drain(..over);
        self.bytes.extend(data);
    }

    /// How many bytes were pushed in all.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The kept bytes as text (invalid UTF-8 replaced), and how many bytes
    /// the buffer itself dropped.
    pub fn text(&self) -> (String, u64) {
        let kept: Vec<u8> = self.bytes.iter().copied().collect();
        let dropped = self.total - kept.len() as u64;
        (String::from_utf8_lossy(&kept).into_owned(), dropped)
    }
}

/// One page of `items` from the cursor `cursor` (an offset as text, none
/// for the first page): as many items as fit in [`PAYLOAD_BUDGET`], and the
/// cursor of the next page when there is one. An item too large to fit
/// even alone is replaced by a note, so every page makes progress.
pub fn page(
    items: Vec<Value>,
    cursor: Option<&str>,
) -> Result<(Vec<Value>, Option<String>), String> {
    let start = match cursor {
        None | Some("") => 0,
        Some(c) => c.parse::<usize>().ok().filter(|n| *n <= items.len()).ok_or_else(|| {
            format!(
                "the cursor \"{}\" is not one this tool handed out; call it again without a cursor to start from the first page",
                c.escape_debug()
            )
        })?,
    };
    let mut used = 0;
    let mut out = Vec::new();
    let mut next = None;
    for (i, item) in items.into_iter().enumerate().skip(start) {
        let len = json_len(&item) + 1;
        if used + len > PAYLOAD_BUDGET {
            if out.is_empty() {
                out.push(serde_json::json!({
                    "omitted": format!("item {i} is larger than {} KiB and was left out", PAYLOAD_BUDGET / 1024)
                }));
                next = Some((i + 1).to_string());
            } else {
                next = Some(i.to_string());
            }
            break;
        }
        used += len;
        out.push(item);
    }
    Ok((out, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lengths_match_serde_json() {
        for s in [
            "",
            "plain",
            "a\"b\\c",
            "line\nnext\ttab",
            "\u{1}\u{1f}",
            "ünï😀",
            "\u{7f}",
        ] {
            assert_eq!(
                json_str_len(s),
                serde_json::to_string(s).unwrap().len(),
                "{s:?}"
            );
        }
    }

    #[test]
    fn tail_and_head_fit_their_budget_on_char_boundaries() {
        let s = "ab\u{1}ü😀\n".repeat(1000);
        for budget in [2, 3, 10, 99, 1000, 100_000] {
            let (t, left) = tail(&s, budget);
            assert!(json_str_len(t) <= budget.max(2), "{budget}");
            assert_eq!(left + t.len(), s.len());
            assert!(s.ends_with(t));
            let (h, left) = head(&s, budget);
            assert!(json_str_len(h) <= budget.max(2), "{budget}");
            assert_eq!(left + h.len(), s.len());
            assert!(s.starts_with(h));
        }
        assert_eq!(tail("abc", 100), ("abc", 0));
        assert_eq!(tail("abcdef", 5), ("def", 3));
        assert_eq!(head("abcdef", 5), ("abc", 3));
    }

    #[test]
    fn split_budget_gives_the_rest_to_the_longer() {
        assert_eq!(split_budget(10, 20, 100), (10, 20));
        assert_eq!(split_budget(10, 200, 100), (10, 90));
        assert_eq!(split_budget(200, 10, 100), (90, 10));
        assert_eq!(split_budget(200, 300, 100), (50, 50));
    }

    #[test]
    fn tail_buffer_keeps_the_last_bytes_and_counts_all() {
        let mut b = TailBuffer::new(5);
        b.push(b"abc");
        b.push(b"defg");
        assert_eq!(b.text(), ("cdefg".to_owned(), 2));
        b.push(b"0123456789");
        assert_eq!(b.text(), ("56789".to_owned(), 12));
        assert_eq!(b.total(), 17);
    }

    #[test]
    fn pages_fit_the_budget_and_cover_every_item_once() {
        let items: Vec<Value> = (0..3000)
            .map(|i| serde_json::json!({"id": i, "pad": "x".repeat(i % 97)}))
            .collect();
        let mut cursor: Option<String> = None;
        let mut seen = Vec::new();
        loop {
            let (page, next) = page(items.clone(), cursor.as_deref()).unwrap();
            assert!(json_len(&Value::Array(page.clone())) <= PAYLOAD_BUDGET + 2);
            seen.extend(page.iter().map(|v| v["id"].as_u64().unwrap()));
            match next {
                Some(n) => cursor = Some(n),
                None => break,
            }
        }
        assert_eq!(seen, (0..3000).collect::<Vec<u64>>());
        let huge = vec![
            serde_json::json!({"big": "y".repeat(PAYLOAD_BUDGET)}),
            serde_json::json!({"id": 1}),
        ];
        let (p, next) = page(huge.clone(), None).unwrap();
        assert!(p[0]["omitted"].is_string());
        assert_eq!(next.as_deref(), Some("1"));
        let (p, next) = page(huge, next.as_deref()).unwrap();
        assert_eq!(p, vec![serde_json::json!({"id": 1})]);
        assert_eq!(next, None);
        assert!(page(vec![], Some("x")).unwrap_err().contains("\"x\""));
        assert!(page(vec![], Some("5")).is_err());
        assert_eq!(page(vec![], None).unwrap(), (vec![], None));
    }
}

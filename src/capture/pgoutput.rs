//! The few pgoutput messages the capture reads: transaction begin and commit
//! (for the commit time and the position to advance to) and logical
//! decoding messages (what the capture trigger emits). Others are skipped.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Begin {
        commit_time: SystemTime,
    },
    /// A `pg_logical_emit_message` payload.
    Logical {
        lsn: u64,
        prefix: String,
        content: Vec<u8>,
    },
    Commit {
        end_lsn: u64,
    },
    Other,
}

/// Microseconds from the Unix epoch to the Postgres epoch (2000-01-01).
const POSTGRES_EPOCH_MICROS: u64 = 946_684_800_000_000;

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn i32(&mut self) -> Option<i32> {
        Some(i32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }

    fn cstring(&mut self) -> Option<String> {
        let end = self.0.iter().position(|b| *b == 0)?;
        let text = String::from_utf8_lossy(&self.0[..end]).into_owned();
        self.0 = &self.0[end + 1..];
        Some(text)
    }
}

/// Parses one message; `None` if it is truncated.
pub fn parse(data: &[u8]) -> Option<Message> {
    let mut r = Reader(data);
    Some(match r.u8()? {
        b'B' => {
            let _final_lsn = r.u64()?;
            let micros = r.u64()?;
            Message::Begin {
                commit_time: UNIX_EPOCH + Duration::from_micros(micros + POSTGRES_EPOCH_MICROS),
            }
        }
        b'M' => {
            let _flags = r.u8()?;
            let lsn = r.u64()?;
            let prefix = r.cstring()?;
            let len = usize::try_from(r.i32()?).ok()?;
            Message::Logical {
                lsn,
                prefix,
                content: r.take(len)?.to_vec(),
            }
        }
        b'C' => {
            let _flags = r.u8()?;
            let _commit_lsn = r.u64()?;
            Message::Commit { end_lsn: r.u64()? }
        }
        _ => Message::Other,
    })
}

/// The text form of a WAL position, `16/B374D848`.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages() {
        let mut begin = vec![b'B'];
        begin.extend(7u64.to_be_bytes());
        begin.extend(1_000_000u64.to_be_bytes());
        begin.extend(42i32.to_be_bytes());
        assert_eq!(
            parse(&begin),
            Some(Message::Begin {
                commit_time: UNIX_EPOCH + Duration::from_micros(POSTGRES_EPOCH_MICROS + 1_000_000)
            })
        );
        let mut logical = vec![b'M', 1];
        logical.extend(0x10u64.to_be_bytes());
        logical.extend(b"strom\0");
        logical.extend(3i32.to_be_bytes());
        logical.extend(b"{} ");
        assert_eq!(
            parse(&logical),
            Some(Message::Logical {
                lsn: 16,
                prefix: "strom".into(),
                content: b"{} ".to_vec()
            })
        );
        assert_eq!(parse(&logical[..10]), None);
        let mut commit = vec![b'C', 0];
        commit.extend(5u64.to_be_bytes());
        commit.extend(9u64.to_be_bytes());
        commit.extend(0u64.to_be_bytes());
        assert_eq!(parse(&commit), Some(Message::Commit { end_lsn: 9 }));
        assert_eq!(parse(b"R..."), Some(Message::Other));
    }

    #[test]
    fn lsns() {
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
    }
}

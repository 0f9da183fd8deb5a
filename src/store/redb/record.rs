//! How one key of `[count]` and `[limits]` is stored: one record per key, so that an event
//! writes one row for it, not one per kind of state.
//!
//! Little-endian: the day an event last used the key (u32, days since 1970: enough for eleven
//! million years), the counter (u64),
//! when the rule last acted (i64 milliseconds; `i64::MIN` for never), then the window's values
//! (i64 each: event times, a period and its count, or value digests).

use crate::store::StoreError;
use crate::store::state::KeyRecord;

const HEADER: usize = 4 + 8 + 8;
const NEVER: i64 = i64::MIN;

/// Writes a key's record into `out`: its counter, window and last action, used on `day`.
pub fn encode(count: u64, window: &[i64], acted: Option<i64>, day: u64, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&u32::try_from(day).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&acted.unwrap_or(NEVER).to_le_bytes());
    for v in window {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// Reads a record.
pub fn decode(bytes: &[u8]) -> Result<KeyRecord, StoreError> {
    let (header, window) = split(bytes)?;
    let acted = i64::from_le_bytes(header[12..20].try_into().expect("8 bytes"));
    Ok(KeyRecord {
        day: day(bytes)?,
        count: u64::from_le_bytes(header[4..12].try_into().expect("8 bytes")),
        acted: (acted != NEVER).then_some(acted),
        window: window
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
    })
}

/// The day an event last used the key, alone.
pub fn day(bytes: &[u8]) -> Result<u64, StoreError> {
    let (header, _) = split(bytes)?;
    Ok(u64::from(u32::from_le_bytes(
        header[..4].try_into().expect("4 bytes"),
    )))
}

fn split(bytes: &[u8]) -> Result<(&[u8], &[u8]), StoreError> {
    if bytes.len() < HEADER || !(bytes.len() - HEADER).is_multiple_of(8) {
        return Err(StoreError::Unavailable(format!(
            "a rule state record of {} bytes cannot be read",
            bytes.len()
        )));
    }
    Ok(bytes.split_at(HEADER))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_back_as_written() {
        let mut bytes = Vec::new();
        encode(7, &[1, -2, i64::MAX], Some(-5), 20_000, &mut bytes);
        assert_eq!(
            decode(&bytes).unwrap(),
            KeyRecord {
                count: 7,
                window: vec![1, -2, i64::MAX],
                acted: Some(-5),
                day: 20_000
            }
        );
        assert!(decode(&bytes[..bytes.len() - 1]).is_err());
        encode(0, &[], None, 1, &mut bytes);
        assert_eq!(decode(&bytes).unwrap().acted, None);
    }
}

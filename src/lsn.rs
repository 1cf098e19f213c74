//! WAL positions (`pg_lsn`): PostgreSQL's `X/Y` text form, as a `u64`.

/// Parses `X/Y` (two hexadecimal halves, as `pg_lsn` prints them).
pub(crate) fn parse(text: &str) -> Option<u64> {
    let (high, low) = text.trim().split_once('/')?;
    let half = |s: &str| {
        (!s.is_empty() && s.len() <= 8)
            .then(|| u32::from_str_radix(s, 16).ok())
            .flatten()
    };
    Some(u64::from(half(high)?) << 32 | u64::from(half(low)?))
}

/// The `X/Y` form of `lsn`.
pub(crate) fn format(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// The timeline in a WAL file name (`pg_walfile_name`): its first eight
/// hexadecimal digits.
pub(crate) fn timeline_of_walfile(name: &str) -> Option<u32> {
    let tli = name.get(..8)?;
    u32::from_str_radix(tli, 16).ok().filter(|&t| t > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_and_bad_text_is_none() {
        assert_eq!(parse("0/16B3748"), Some(0x16B_3748));
        assert_eq!(parse("1/0"), Some(1 << 32));
        assert_eq!(parse("FFFFFFFF/FFFFFFFF"), Some(u64::MAX));
        for lsn in [0, 1, 0x16B_3748, (7 << 32) | 0xABC, u64::MAX] {
            assert_eq!(parse(&format(lsn)), Some(lsn));
        }
        for bad in [
            "",
            "/",
            "0/",
            "/1",
            "12345",
            "0/1/2",
            "G/1",
            "100000000/0",
            "-1/0",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn timeline_from_a_wal_file_name() {
        assert_eq!(timeline_of_walfile("000000020000000000000003"), Some(2));
        assert_eq!(timeline_of_walfile("0000000A0000000000000003"), Some(10));
        assert_eq!(timeline_of_walfile("00000000"), None);
        assert_eq!(timeline_of_walfile("0002"), None);
    }
}

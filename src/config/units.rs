//! The two units the config file speaks besides plain numbers: sizes
//! (`"256KiB"`) and durations (`"4s"`, `"10m"`).

use std::time::Duration;

/// Parses a byte size: a whole number with an optional unit, `B`, `KB` (1000),
/// `KiB` (1024), `MB` (1000²) or `MiB` (1024²). Units are case-sensitive
/// because `mb` (millibit) and `Mb` (megabit) mean other things.
pub(crate) fn parse_size(text: &str) -> Result<usize, String> {
    let invalid = || {
        format!("invalid size {text:?}: expected a whole number of bytes with an optional unit B, KB, KiB, MB or MiB, e.g. \"256KiB\"")
    };
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(split);
    let multiplier: usize = match unit.trim_start() {
        "" | "B" => 1,
        "KB" => 1000,
        "KiB" => 1024,
        "MB" => 1000 * 1000,
        "MiB" => 1024 * 1024,
        _ => return Err(invalid()),
    };
    let number: usize = digits.parse().map_err(|_| invalid())?;
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

/// The inverse of [`parse_size`] for reports: `262144` → `256KiB`.
pub(crate) fn format_size(bytes: usize) -> String {
    match bytes {
        0 => "0B".to_owned(),
        b if b % (1 << 20) == 0 => format!("{}MiB", b >> 20),
        b if b % (1 << 10) == 0 => format!("{}KiB", b >> 10),
        b => format!("{b}B"),
    }
}

/// Parses a duration such as `"4s"`, `"300ms"`, `"10m"` or `"1h 30m"`.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| {
        format!("invalid duration {text:?} ({e}): expected e.g. \"4s\", \"10m\", \"2h\"")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("256KiB"), Ok(256 * 1024));
        assert_eq!(parse_size("2KB"), Ok(2000));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("3MB"), Ok(3_000_000));
        assert_eq!(parse_size("256 KiB"), Ok(256 * 1024));
    }

    #[test]
    fn bad_sizes() {
        for text in ["", "KiB", "12 parsecs", "1kib", "1.5MiB", "-1", "1GiB"] {
            let err = parse_size(text).unwrap_err();
            assert!(err.contains("invalid size"), "{text}: {err}");
        }
        assert!(parse_size("99999999999999999999MiB").is_err());
    }

    #[test]
    fn formats_sizes_so_they_parse_back() {
        for (bytes, text) in [(262144, "256KiB"), (1 << 20, "1MiB"), (1000, "1000B")] {
            assert_eq!(format_size(bytes), text);
            assert_eq!(parse_size(text), Ok(bytes));
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("4s"), Ok(Duration::from_secs(4)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("300ms"), Ok(Duration::from_millis(300)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert!(parse_duration("4")
            .unwrap_err()
            .contains("invalid duration \"4\""));
        assert!(parse_duration("soon").is_err());
    }
}

//! Sizes as people write them: "10G", "512M", "4K", "1.5T", "4096"; binary units (K = 1024).

const UNITS: [(char, u32); 6] = [('K', 10), ('M', 20), ('G', 30), ('T', 40), ('P', 50), ('E', 60)];

/// Parses a size: digits (an optional fraction), then an optional unit K/M/G/T/P/E, optionally
/// followed by "iB" or "B"; case-insensitive.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let bad = || format!("invalid size '{s}' (examples: 4096, 4K, 512M, 10G, 1.5T)");
    let upper = t.to_ascii_uppercase();
    let body = upper.strip_suffix("IB").or_else(|| upper.strip_suffix('B')).unwrap_or(&upper);
    let (num, shift) = match body.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let shift = UNITS.iter().find(|u| u.0 == c).map(|u| u.1).ok_or_else(bad)?;
            (&body[..body.len() - 1], shift)
        }
        _ => (body, 0),
    };
    if num.is_empty() || !num.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(bad());
    }
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if int.is_empty() || frac.contains('.') {
        return Err(bad());
    }
    let whole: u64 = int.parse().map_err(|_| bad())?;
    let mut v = whole.checked_shl(shift).filter(|v| v >> shift == whole).ok_or_else(bad)?;
    if !frac.is_empty() {
        let digits = frac.len().min(9) as u32;
        let f: u64 = frac[..digits as usize].parse().map_err(|_| bad())?;
        let add = (u128::from(f) << shift) / 10u128.pow(digits);
        v = v.checked_add(u64::try_from(add).map_err(|_| bad())?).ok_or_else(bad)?;
    }
    Ok(v)
}

/// Shows a size the way it would be written: "10G", "512M", "1.5G", "100B".
pub fn format_size(v: u64) -> String {
    for &(c, shift) in UNITS.iter().rev() {
        let unit = 1u64 << shift;
        if v >= unit {
            if v.is_multiple_of(unit) {
                return format!("{}{c}", v >> shift);
            }
            let tenths = (u128::from(v) * 10 + u128::from(unit) / 2) / u128::from(unit);
            return format!("{}.{}{c}", tenths / 10, tenths % 10);
        }
    }
    format!("{v}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_people_write() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("1.5T"), Ok(3 << 39));
        assert_eq!(parse_size("100B"), Ok(100));
    }

    #[test]
    fn rejects_garbage_and_overflow() {
        for s in ["", "G", "10X", "1..5G", "-1", "99999999999E", "1 0G"] {
            assert!(parse_size(s).is_err(), "{s} accepted");
        }
    }

    #[test]
    fn formats_the_way_it_parses() {
        assert_eq!(format_size(10 << 30), "10G");
        assert_eq!(format_size(512 << 20), "512M");
        assert_eq!(format_size(4096), "4K");
        assert_eq!(format_size(3 << 29), "1.5G");
        assert_eq!(format_size(100), "100B");
        for v in [4096u64, 10 << 30, 512 << 20, 7 << 40] {
            assert_eq!(parse_size(&format_size(v)), Ok(v));
        }
    }
}

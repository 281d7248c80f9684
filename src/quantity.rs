//! Kubernetes resource quantities ("500m", "1.5Gi", "2e3"), parsed once at the edge
//! into integer units so that nothing downstream passes strings around.
//!
//! CPU is held in millicores, every other resource in its base unit (bytes for
//! memory and storage, a count for devices and pods). Fractions round up, as the
//! kubelet does when it admits a pod.

use thiserror::Error;

/// Why a quantity string could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum QuantityError {
    #[error("empty quantity")]
    Empty,
    #[error(
        "invalid quantity {0:?}: expected a number with an optional suffix (m, k, M, G, Ki, Mi, Gi, ...)"
    )]
    Invalid(String),
    #[error("quantity {0:?} is negative")]
    Negative(String),
    #[error("quantity {0:?} is too large")]
    TooLarge(String),
    #[error("quantity {0:?} is fractional: extended resources (devices) take whole numbers")]
    Fractional(String),
}

/// The integer scale a resource is held in after parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Thousandths of the written value (CPU in millicores).
    Milli,
    /// The written value itself (bytes, devices, pods).
    Base,
}

/// Parse a Kubernetes quantity into an integer in `unit`, rounding any fraction up.
pub fn parse_quantity(text: &str, unit: Unit) -> Result<i64, QuantityError> {
    let s = text.trim();
    if s.is_empty() {
        return Err(QuantityError::Empty);
    }
    let invalid = || QuantityError::Invalid(text.to_string());
    let (negative, s) = match s.as_bytes()[0] {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    let number_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(number_end);
    if number.is_empty() || number == "." || number.matches('.').count() > 1 {
        return Err(invalid());
    }
    let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
    if int_part.len() + frac_part.len() > 30 {
        return Err(QuantityError::TooLarge(text.to_string()));
    }
    let digits = format!("{int_part}{frac_part}");
    let mut numerator: i128 = digits.parse().map_err(|_| invalid())?;
    // value = numerator * 10^exp10 * 2^exp2
    let mut exp10: i32 = -(frac_part.len() as i32);
    let mut exp2: u32 = 0;
    match suffix {
        "" => {}
        "n" => exp10 -= 9,
        "u" => exp10 -= 6,
        "m" => exp10 -= 3,
        "k" => exp10 += 3,
        "M" => exp10 += 6,
        "G" => exp10 += 9,
        "T" => exp10 += 12,
        "P" => exp10 += 15,
        "E" => exp10 += 18,
        "Ki" => exp2 = 10,
        "Mi" => exp2 = 20,
        "Gi" => exp2 = 30,
        "Ti" => exp2 = 40,
        "Pi" => exp2 = 50,
        "Ei" => exp2 = 60,
        other if other.starts_with(['e', 'E']) => {
            let exponent: i32 = other[1..].parse().map_err(|_| invalid())?;
            if exponent.abs() > 30 {
                return Err(QuantityError::TooLarge(text.to_string()));
            }
            exp10 += exponent;
        }
        _ => return Err(invalid()),
    }
    if negative && numerator != 0 {
        return Err(QuantityError::Negative(text.to_string()));
    }
    if unit == Unit::Milli {
        exp10 += 3;
    }
    let too_large = || QuantityError::TooLarge(text.to_string());
    numerator = numerator.checked_shl(exp2).ok_or_else(too_large)?;
    if numerator != 0 && numerator.leading_zeros() < 2 {
        return Err(too_large());
    }
    let value = if exp10 >= 0 {
        numerator
            .checked_mul(10i128.checked_pow(exp10 as u32).ok_or_else(too_large)?)
            .ok_or_else(too_large)?
    } else {
        let divisor = 10i128.checked_pow((-exp10) as u32).ok_or_else(too_large)?;
        (numerator + divisor - 1) / divisor
    };
    i64::try_from(value).map_err(|_| too_large())
}

/// Format an integer amount back into a readable Kubernetes quantity.
pub fn format_quantity(value: i64, unit: Unit) -> String {
    match unit {
        Unit::Milli => {
            if value % 1000 == 0 {
                format!("{}", value / 1000)
            } else {
                format!("{value}m")
            }
        }
        Unit::Base => {
            for (suffix, shift) in [("Ti", 40), ("Gi", 30), ("Mi", 20), ("Ki", 10)] {
                let factor = 1i64 << shift;
                if value != 0 && value % factor == 0 {
                    return format!("{}{suffix}", value / factor);
                }
            }
            format!("{value}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_in_millicores() {
        assert_eq!(parse_quantity("500m", Unit::Milli), Ok(500));
        assert_eq!(parse_quantity("1", Unit::Milli), Ok(1000));
        assert_eq!(parse_quantity("1.5", Unit::Milli), Ok(1500));
        assert_eq!(parse_quantity("0.0001", Unit::Milli), Ok(1), "rounds up");
        assert_eq!(parse_quantity("250000u", Unit::Milli), Ok(250));
        assert_eq!(parse_quantity("2e3", Unit::Milli), Ok(2_000_000));
    }

    #[test]
    fn parses_memory_in_bytes() {
        assert_eq!(parse_quantity("512Mi", Unit::Base), Ok(512 << 20));
        assert_eq!(parse_quantity("1.5Gi", Unit::Base), Ok(3 << 29));
        assert_eq!(parse_quantity("1G", Unit::Base), Ok(1_000_000_000));
        assert_eq!(parse_quantity("128974848", Unit::Base), Ok(128_974_848));
        assert_eq!(parse_quantity("129e6", Unit::Base), Ok(129_000_000));
        assert_eq!(parse_quantity("1k", Unit::Base), Ok(1000));
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "abc", "1.2.3", "1Zi", "--1", "1.5.3Gi", ".", "1e", "Gi"] {
            assert!(parse_quantity(bad, Unit::Base).is_err(), "{bad:?} accepted");
        }
        assert!(matches!(
            parse_quantity("-1", Unit::Base),
            Err(QuantityError::Negative(_))
        ));
        assert!(matches!(
            parse_quantity("99999999Ei", Unit::Base),
            Err(QuantityError::TooLarge(_))
        ));
    }

    #[test]
    fn formats_round_trip() {
        assert_eq!(format_quantity(1500, Unit::Milli), "1500m");
        assert_eq!(format_quantity(4000, Unit::Milli), "4");
        assert_eq!(format_quantity(16 << 30, Unit::Base), "16Gi");
        assert_eq!(format_quantity(3, Unit::Base), "3");
    }
}

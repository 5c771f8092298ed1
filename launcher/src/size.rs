//! Parsing `-m SIZE`: bytes, a `K`/`M`/`G`/`T` suffix (binary, either case),
//! decimal or `0x` hexadecimal.

use vkabi::{PAGE_SIZE, RAM_SIZE_MAX};

/// Why a `-m` value was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizeError {
    /// nothing was given
    #[error("empty size")]
    Empty,
    /// not a number with an optional K/M/G/T suffix
    #[error("not a size (bytes, or a number with a K, M, G or T suffix)")]
    Syntax,
    /// a letter other than K, M, G or T after the number
    #[error("unknown suffix {0} (use K, M, G or T)")]
    UnknownSuffix(char),
    /// too large to represent
    #[error("too large")]
    Overflow,
    /// zero bytes
    #[error("must be greater than 0")]
    Zero,
    /// not page-aligned
    #[error("must be a multiple of 4096")]
    Unaligned,
    /// above the VPTE frame limit
    #[error("must be at most 256T (2^48 bytes, the VPTE frame limit)")]
    TooLarge,
    /// more than this host can map
    #[error("{0}")]
    Host(String),
}

/// Parse and validate a RAM size.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    if text.is_empty() {
        return Err(SizeError::Empty);
    }
    let (digits, shift) = match text.as_bytes()[text.len() - 1].to_ascii_uppercase() {
        b'K' => (&text[..text.len() - 1], 10),
        b'M' => (&text[..text.len() - 1], 20),
        b'G' => (&text[..text.len() - 1], 30),
        b'T' => (&text[..text.len() - 1], 40),
        c if c.is_ascii_alphabetic() && !text.starts_with("0x") && !text.starts_with("0X") => {
            let digits = &text[..text.len() - 1];
            if !digits.is_empty() && digits.chars().all(|d| d.is_ascii_digit()) {
                return Err(SizeError::UnknownSuffix(
                    text.as_bytes()[text.len() - 1] as char,
                ));
            }
            return Err(SizeError::Syntax);
        }
        _ => (text, 0),
    };
    let (digits, radix) = match digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        Some(hex) => (hex, 16),
        None => (digits, 10),
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(SizeError::Syntax);
    }
    let value = u64::from_str_radix(digits, radix).map_err(|_| SizeError::Overflow)?;
    let bytes = value.checked_mul(1 << shift).ok_or(SizeError::Overflow)?;
    if bytes == 0 {
        return Err(SizeError::Zero);
    }
    if bytes > RAM_SIZE_MAX {
        return Err(SizeError::TooLarge);
    }
    if bytes % PAGE_SIZE != 0 {
        return Err(SizeError::Unaligned);
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_sizes() {
        let cases = [
            ("4096", 4096),
            ("4k", 4096),
            ("4K", 4096),
            ("256M", 256 << 20),
            ("256m", 256 << 20),
            ("1G", 1 << 30),
            ("2g", 2 << 30),
            ("1T", 1 << 40),
            ("256T", 1 << 48),
            ("0x4000000", 0x400_0000),
            ("0X1000", 4096),
            ("0x10M", 16 << 20),
            ("281474976710656", 1 << 48),
        ];
        for (text, want) in cases {
            assert_eq!(parse_size(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn invalid_sizes() {
        let cases = [
            ("", SizeError::Empty),
            ("0", SizeError::Zero),
            ("0K", SizeError::Zero),
            ("12x", SizeError::UnknownSuffix('x')),
            ("4097", SizeError::Unaligned),
            ("-1", SizeError::Syntax),
            ("1P", SizeError::UnknownSuffix('P')),
            ("1.5P", SizeError::Syntax),
            ("M", SizeError::Syntax),
            ("0x", SizeError::Syntax),
            ("1.5G", SizeError::Syntax),
            (" 4096", SizeError::Syntax),
            ("+4096", SizeError::Syntax),
            ("257T", SizeError::TooLarge),
            ("99999999999999999999", SizeError::Overflow),
            ("18446744073709551615T", SizeError::Overflow),
            ("0x1ffffffffffffffff", SizeError::Overflow),
            ("281474976714752", SizeError::TooLarge),
        ];
        for (text, want) in cases {
            assert_eq!(parse_size(text), Err(want), "{text:?}");
        }
    }
}

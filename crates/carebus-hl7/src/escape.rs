//! HL7 v2 escape sequences.
//!
//! Decoding ([`decode`]) handles, with the message's own escape character
//! (written `\` here):
//!
//! | sequence | decoded to |
//! | --- | --- |
//! | `\F\` `\S\` `\T\` `\R\` `\E\` | field, component, subcomponent, repetition separator, escape character |
//! | `\P\` | the truncation character (HL7 2.7) if MSH-2 declares one; otherwise preserved |
//! | `\Xhhhh…\` | the bytes given in hex (an even, non-zero number of hex digits); otherwise preserved |
//! | `\.br\` | a line feed (`\n`, 0x0A) |
//! | anything else | preserved verbatim, escape characters included |
//!
//! "Anything else" covers `\H\`/`\N\` (highlighting), `\Zxx\` (locally
//! defined), the character set switches `\Cxxyy\` and `\Mxxyyzz\`, the
//! other formatting commands (`\.sp\`, `\.in\`, …) and malformed sequences
//! (an escape character without a closing one). They are kept as they
//! were received because dropping them could silently change meaning
//! (a charset switch changes how the following bytes must be read), and
//! interpreting them requires knowledge of the receiving application.
//!
//! Encoding ([`encode`]) escapes the five delimiters (and the truncation
//! character if declared) and writes every C0 control character except TAB
//! (so CR, LF, NUL and the MLLP framing bytes 0x0B and 0x1C) as `\Xhh\`.
//! Hex escapes are valid in every data type (unlike `\.br\`, which only
//! FT/TX allow), so encoded text can never break a segment or a frame, and
//! never fails strict validation. Every byte sequence
//! round-trips: `decode(encode(x)) == x`. Text without delimiters,
//! escape characters or line breaks is returned unchanged by both.

use std::borrow::Cow;

use crate::encoding::Delimiters;

/// Decodes the escape sequences in `raw` (see the module docs).
///
/// Returns the input borrowed when it holds no escape character.
pub fn decode<'a>(raw: &'a [u8], delims: &Delimiters) -> Cow<'a, [u8]> {
    let esc = delims.escape;
    if !raw.contains(&esc) {
        return Cow::Borrowed(raw);
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(start) = rest.iter().position(|&b| b == esc) {
        out.extend_from_slice(rest.get(..start).unwrap_or_default());
        let after = rest.get(start.saturating_add(1)..).unwrap_or_default();
        let Some(len) = after.iter().position(|&b| b == esc) else {
            // Unterminated escape: keep the rest verbatim.
            out.extend_from_slice(rest.get(start..).unwrap_or_default());
            return Cow::Owned(out);
        };
        let content = after.get(..len).unwrap_or_default();
        if !decode_sequence(content, delims, &mut out) {
            out.push(esc);
            out.extend_from_slice(content);
            out.push(esc);
        }
        rest = after.get(len.saturating_add(1)..).unwrap_or_default();
    }
    out.extend_from_slice(rest);
    Cow::Owned(out)
}

/// Appends the decoding of one escape sequence's content; false if the
/// sequence is not one this crate decodes.
fn decode_sequence(content: &[u8], delims: &Delimiters, out: &mut Vec<u8>) -> bool {
    match content {
        b"F" => out.push(delims.field),
        b"S" => out.push(delims.component),
        b"T" => out.push(delims.subcomponent),
        b"R" => out.push(delims.repetition),
        b"E" => out.push(delims.escape),
        b"P" => match delims.truncation {
            Some(t) => out.push(t),
            None => return false,
        },
        b".br" => out.push(b'\n'),
        [b'X', hex @ ..] => {
            if hex.is_empty() || hex.len() % 2 != 0 {
                return false;
            }
            let mut bytes = Vec::with_capacity(hex.len() / 2);
            for pair in hex.chunks_exact(2) {
                match (
                    pair.first().and_then(|&h| hex_val(h)),
                    pair.get(1).and_then(|&l| hex_val(l)),
                ) {
                    (Some(h), Some(l)) => bytes.push((h << 4) | l),
                    _ => return false,
                }
            }
            out.extend_from_slice(&bytes);
        }
        _ => return false,
    }
    true
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Control characters written as hex escapes by [`encode`].
fn is_hex_encoded(b: u8) -> bool {
    b < 0x20 && b != b'\t'
}

/// True if `text` must be changed by [`encode`].
fn needs_encoding(text: &[u8], delims: &Delimiters) -> bool {
    text.iter()
        .any(|&b| delims.is_special(b) || is_hex_encoded(b))
}

/// Escapes `text` for use as the content of one field, component or
/// subcomponent (see the module docs).
///
/// Returns the input borrowed when nothing needs escaping.
pub fn encode<'a>(text: &'a [u8], delims: &Delimiters) -> Cow<'a, [u8]> {
    if !needs_encoding(text, delims) {
        return Cow::Borrowed(text);
    }
    let mut out = Vec::with_capacity(text.len().saturating_add(16));
    encode_into(text, delims, &mut out);
    Cow::Owned(out)
}

/// Appends the escaped form of `text` to `out`.
pub fn encode_into(text: &[u8], delims: &Delimiters, out: &mut Vec<u8>) {
    let esc = delims.escape;
    for &b in text {
        let code: &[u8] = if b == delims.field {
            b"F"
        } else if b == delims.component {
            b"S"
        } else if b == delims.subcomponent {
            b"T"
        } else if b == delims.repetition {
            b"R"
        } else if b == esc {
            b"E"
        } else if Some(b) == delims.truncation {
            b"P"
        } else if is_hex_encoded(b) {
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            let hi = HEX.get(usize::from(b >> 4)).copied().unwrap_or(b'0');
            let lo = HEX.get(usize::from(b & 0x0F)).copied().unwrap_or(b'0');
            out.extend_from_slice(&[esc, b'X', hi, lo, esc]);
            continue;
        } else {
            out.push(b);
            continue;
        };
        out.push(esc);
        out.extend_from_slice(code);
        out.push(esc);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const D: Delimiters = Delimiters::DEFAULT;

    fn dec(s: &str) -> Vec<u8> {
        decode(s.as_bytes(), &D).into_owned()
    }

    #[test]
    fn decodes_delimiter_escapes() {
        assert_eq!(dec(r"a\F\b\S\c\T\d\R\e\E\f"), b"a|b^c&d~e\\f".to_vec());
    }

    #[test]
    fn decodes_hex_and_line_break() {
        assert_eq!(dec(r"x\X0D0A\y"), b"x\r\ny".to_vec());
        assert_eq!(dec(r"\Xc3bc\"), "ü".as_bytes().to_vec());
        assert_eq!(dec(r"one\.br\two"), b"one\ntwo".to_vec());
    }

    #[test]
    fn preserves_unknown_and_malformed() {
        for s in [
            r"\H\bold\N\",
            r"\Zfoo\",
            r"\C2842\",
            r"\M2442\",
            r"\.sp2\",
            r"\X0\",
            r"\XZZ\",
            r"\X\",
            r"\P\",
            r"tail\unterminated",
            r"\\",
        ] {
            assert_eq!(dec(s), s.as_bytes().to_vec(), "{s}");
        }
    }

    #[test]
    fn truncation_escape_needs_declared_char() {
        let d = Delimiters::DEFAULT_V27;
        assert_eq!(decode(br"a\P\b", &d).as_ref(), b"a#b");
        assert_eq!(encode(b"a#b", &d).as_ref(), br"a\P\b");
        assert_eq!(encode(b"a#b", &D).as_ref(), b"a#b");
    }

    #[test]
    fn borrowed_when_plain() {
        assert!(matches!(decode(b"plain text", &D), Cow::Borrowed(_)));
        assert!(matches!(encode(b"plain text", &D), Cow::Borrowed(_)));
    }

    #[test]
    fn encode_escapes_everything_structural() {
        assert_eq!(
            encode(b"a|b^c&d~e\\f\rg\nh", &D).as_ref(),
            br"a\F\b\S\c\T\d\R\e\E\f\X0D\g\X0A\h"
        );
        assert_eq!(
            encode(b"\0\x0b\x1c\x1f\t\x7f", &D).as_ref(),
            b"\\X00\\\\X0B\\\\X1C\\\\X1F\\\t\x7f"
        );
    }

    #[test]
    fn custom_escape_character() {
        let d = Delimiters {
            escape: b'!',
            ..Delimiters::DEFAULT
        };
        assert_eq!(decode(b"a!F!b!E!", &d).as_ref(), b"a|b!");
        assert_eq!(encode(b"a|b!\\", &d).as_ref(), b"a!F!b!E!\\");
    }
}

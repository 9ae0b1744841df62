//! Rules for the names that travel on the wire: users, groups and files.
//!
//! Names are embedded in `|`-separated headers, in space-separated commands and in file
//! paths on both sides, so each rule below closes a way to confuse one of those. Names are
//! also read by people: no name may hold an invisible (default-ignorable) or a
//! bidirectional control code point, names are compared in NFC ([`normalize`]), and two
//! users whose names share a confusable skeleton (Unicode TS #39, [`skeleton`]) cannot be
//! online at once. The Unicode data comes from maintained crates (ICU4X's
//! `icu_properties`, `unicode-normalization`, `unicode-security`), not from tables here.

use icu_properties::props::{BidiControl, BinaryProperty, DefaultIgnorableCodePoint};
use unicode_normalization::UnicodeNormalization;

/// Longest username, in characters.
pub const MAX_USERNAME_CHARS: usize = 32;
/// Longest group name, in characters.
pub const MAX_GROUP_CHARS: usize = 64;
/// Longest file name, in bytes (the common file-system limit for one path component).
pub const MAX_FILENAME_BYTES: usize = 255;
/// What a receiving client appends to a saved name while the file is incomplete; the
/// server refuses names that would leave no room for it.
pub const TMP_SUFFIX: &str = ".tmp";
/// Prefix of every file the server or a client saves; `received_from_` + sender + `_` +
/// name must itself fit in one path component.
const SAVED_PREFIX: &str = "received_from_";

/// Why a name was refused. The text is what the user is told after `ERROR: `.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Nothing left after trimming.
    #[error("{kind} is empty")]
    Empty {
        /// "username", "group name" or "file name".
        kind: &'static str,
    },
    /// Over the length limit.
    #[error("{kind} is longer than {limit} {unit}")]
    TooLong {
        /// What kind of name.
        kind: &'static str,
        /// The limit.
        limit: usize,
        /// "characters" or "bytes".
        unit: &'static str,
    },
    /// Contains a character the rules forbid.
    #[error("{kind} may not contain {what}")]
    BadChar {
        /// What kind of name.
        kind: &'static str,
        /// A description of the offending character.
        what: &'static str,
    },
    /// `.` or `..`.
    #[error("{kind} may not be '.' or '..'")]
    Dots {
        /// What kind of name.
        kind: &'static str,
    },
    /// A bidirectional control (U+202E and friends), which reorders what people see.
    #[error("{kind} may not contain U+{:04X}, a bidirectional control character", *.code as u32)]
    Bidi {
        /// What kind of name.
        kind: &'static str,
        /// The code point.
        code: char,
    },
    /// A default-ignorable code point (U+200B and friends), which shows as nothing.
    #[error("{kind} may not contain U+{:04X}, an invisible character", *.code as u32)]
    Invisible {
        /// What kind of name.
        kind: &'static str,
        /// The code point.
        code: char,
    },
}

/// A name in the form the server keeps and compares: NFC. Borrowed when it already is
/// (always for ASCII, and usually otherwise: the quick check decides without copying).
pub fn normalize(name: &str) -> std::borrow::Cow<'_, str> {
    use unicode_normalization::{is_nfc_quick, IsNormalized};
    if name.is_ascii() || is_nfc_quick(name.chars()) == IsNormalized::Yes {
        return std::borrow::Cow::Borrowed(name);
    }
    std::borrow::Cow::Owned(name.nfc().collect())
}

/// A name's confusable skeleton (Unicode TS #39): two names with the same skeleton look
/// alike (`alice` and `аlice` with a Cyrillic `а`, `rn` and `m`).
pub fn skeleton(name: &str) -> String {
    unicode_security::skeleton(name).collect()
}

fn describe(c: char) -> Option<&'static str> {
    match c {
        '|' => Some("'|'"),
        '/' => Some("'/'"),
        '\\' => Some("'\\'"),
        '\0' => Some("NUL"),
        c if c.is_control() => Some("control characters"),
        _ => None,
    }
}

fn check(name: &str, kind: &'static str, limit: usize, allow_space: bool) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { kind });
    }
    if name.chars().count() > limit {
        return Err(NameError::TooLong {
            kind,
            limit,
            unit: "characters",
        });
    }
    for c in name.chars() {
        if let Some(what) = describe(c) {
            return Err(NameError::BadChar { kind, what });
        }
        if BidiControl::for_char(c) {
            return Err(NameError::Bidi { kind, code: c });
        }
        if DefaultIgnorableCodePoint::for_char(c) {
            return Err(NameError::Invisible { kind, code: c });
        }
        if !allow_space && c.is_whitespace() {
            return Err(NameError::BadChar {
                kind,
                what: "whitespace",
            });
        }
    }
    Ok(())
}

/// A username: 1 to 32 characters; no whitespace, `|`, `/`, `\`, or control characters;
/// not `.`, `..`, or starting with `GROUP:`.
pub fn check_username(name: &str) -> Result<(), NameError> {
    check(name, "username", MAX_USERNAME_CHARS, false)?;
    if name == "." || name == ".." {
        // It becomes part of saved file names, where these are no names at all.
        return Err(NameError::Dots { kind: "username" });
    }
    if name.starts_with("GROUP:") {
        return Err(NameError::BadChar {
            kind: "username",
            what: "the prefix 'GROUP:'",
        });
    }
    Ok(())
}

/// A group name: 1 to 64 characters; the same forbidden characters as a username.
pub fn check_group(name: &str) -> Result<(), NameError> {
    check(name, "group name", MAX_GROUP_CHARS, false)
}

/// A file name: one bare path component of at most 255 bytes. Spaces are allowed (people
/// name files that way); directories, `..`, `|`, backslashes and control characters are not.
pub fn check_filename(name: &str) -> Result<(), NameError> {
    check_component(name, "file name")
}

/// A name that becomes part of one path component: the rules of [`check_filename`]. A
/// client applies them to a forwarded sender's name, which a lab server does not restrict.
pub fn check_component(name: &str, kind: &'static str) -> Result<(), NameError> {
    if name.len() > MAX_FILENAME_BYTES {
        return Err(NameError::TooLong {
            kind,
            limit: MAX_FILENAME_BYTES,
            unit: "bytes",
        });
    }
    check(name, kind, MAX_FILENAME_BYTES, true)?;
    if name == "." || name == ".." {
        return Err(NameError::Dots { kind });
    }
    Ok(())
}

/// The name under which a file from `sender` called `filename` is saved, on the server and
/// by the receiving client alike: `received_from_<sender>_<filename>`.
pub fn saved_name(sender: &str, filename: &str) -> String {
    let mut s = String::with_capacity(SAVED_PREFIX.len() + sender.len() + 1 + filename.len());
    s.push_str(SAVED_PREFIX);
    s.push_str(sender);
    s.push('_');
    s.push_str(filename);
    s
}

/// The `n`-th name to try for a saved file whose name is taken (`n` ≥ 2):
/// `received_from_a_x (2).txt`; the count goes before the last extension.
pub fn numbered(saved: &str, n: u32) -> String {
    match saved.rfind('.') {
        Some(dot) if dot > 0 && dot + 1 < saved.len() => {
            format!("{} ({n}){}", &saved[..dot], &saved[dot..])
        }
        _ => format!("{saved} ({n})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames() {
        assert!(check_username("yasser").is_ok());
        assert!(check_username("ünïcode_1").is_ok());
        assert_eq!(
            check_username(""),
            Err(NameError::Empty { kind: "username" })
        );
        for bad in [
            "a b", "a|b", "a/b", "a\\b", "a\0b", "a\tb", "GROUP:x", ".", "..",
        ] {
            assert!(check_username(bad).is_err(), "{bad:?} accepted");
        }
        assert!(check_username(&"x".repeat(32)).is_ok());
        assert!(check_username(&"x".repeat(33)).is_err());
        assert_eq!(
            check_username("a b").map_err(|e| e.to_string()),
            Err("username may not contain whitespace".into())
        );
    }

    #[test]
    fn group_names() {
        assert!(check_group("devs").is_ok());
        assert!(check_group("dev team").is_err());
        assert!(check_group(&"g".repeat(65)).is_err());
    }

    #[test]
    fn file_names() {
        for good in ["report.pdf", "my slides.pptx", ".hidden", "a..b"] {
            assert!(check_filename(good).is_ok(), "{good:?} refused");
        }
        for bad in [
            "",
            ".",
            "..",
            "../etc/passwd",
            "/etc/passwd",
            "dir/file",
            "..\\win",
            "a|b",
            "nul\0",
            "bell\x07",
        ] {
            assert!(check_filename(bad).is_err(), "{bad:?} accepted");
        }
        assert!(check_filename(&"é".repeat(128)).is_err());
        assert!(check_filename(&"e".repeat(255)).is_ok());
    }

    #[test]
    fn invisible_and_bidi_code_points_are_refused_in_every_name() {
        assert_eq!(
            check_username("alice\u{200B}").map_err(|e| e.to_string()),
            Err("username may not contain U+200B, an invisible character".into())
        );
        assert_eq!(
            check_filename("up_a\u{202E}txt.exe").map_err(|e| e.to_string()),
            Err("file name may not contain U+202E, a bidirectional control character".into())
        );
        for bad in [
            "a\u{2066}b",
            "a\u{200D}b",
            "a\u{FEFF}",
            "a\u{180B}",
            "a\u{061C}",
        ] {
            assert!(check_username(bad).is_err(), "{bad:?} accepted");
            assert!(check_group(bad).is_err(), "{bad:?} accepted");
            assert!(check_filename(bad).is_err(), "{bad:?} accepted");
        }
        assert!(check_username("zoë").is_ok());
        assert!(check_filename("日本語 ファイル.txt").is_ok());
    }

    #[test]
    fn names_compare_in_nfc_and_look_alikes_share_a_skeleton() {
        assert_eq!(normalize("zoe\u{0308}"), "zo\u{00EB}");
        assert_eq!(skeleton("alice"), skeleton("\u{0430}lice"));
        assert_eq!(skeleton("paypal"), skeleton("paypa\u{04CF}"));
        assert_eq!(skeleton("zoe\u{0308}"), skeleton("zo\u{00EB}"));
        assert_ne!(skeleton("alice"), skeleton("bob"));
    }

    #[test]
    fn a_taken_name_gets_a_number_before_its_extension() {
        assert_eq!(
            numbered("received_from_a_b_c.txt", 2),
            "received_from_a_b_c (2).txt"
        );
        assert_eq!(
            numbered("received_from_a_notes", 3),
            "received_from_a_notes (3)"
        );
        assert_eq!(numbered("archive.tar.gz", 2), "archive.tar (2).gz");
        assert_eq!(numbered("trailing.", 2), "trailing. (2)");
    }

    #[test]
    fn saved_names() {
        assert_eq!(
            saved_name("yasser", "report.pdf"),
            "received_from_yasser_report.pdf"
        );
    }
}

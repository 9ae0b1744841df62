//! The file port's headers.
//!
//! Upload, client to server: `sender|target|filename|filesize\n` and then exactly
//! `filesize` bytes; `target` is a username or `GROUP:<group>`.
//! Forward, server to recipient: `sender|filename|filesize\n` and then the bytes.

use super::names::{
    check_component, check_filename, check_group, check_username, normalize, NameError,
};

/// The prefix that makes an upload's target a group.
pub const GROUP_PREFIX: &str = "GROUP:";

/// Where an upload goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One user.
    User(String),
    /// Every other member of a group.
    Group(String),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::User(u) => f.write_str(u),
            Target::Group(g) => write!(f, "{GROUP_PREFIX}{g}"),
        }
    }
}

/// Why an upload header was refused. The text follows `ERROR: ` on the uploader's chat.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Not valid UTF-8.
    #[error("invalid file header: not valid UTF-8")]
    NotUtf8,
    /// Not four `|`-separated fields.
    #[error("invalid file header: expected sender|target|filename|filesize, got {0} field(s)")]
    FieldCount(usize),
    /// The size is not a whole number of bytes.
    #[error("invalid file header: filesize '{0}' is not a whole number of bytes")]
    Size(String),
    /// A name breaks the rules.
    #[error("invalid file header: {0}")]
    Name(#[from] NameError),
}

/// An upload header, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadHeader {
    /// Who the uploader says it is (the server trusts its own record instead).
    pub sender: String,
    /// Where the file goes.
    pub target: Target,
    /// The file's bare name.
    pub filename: String,
    /// Exactly how many bytes follow.
    pub size: u64,
}

/// Sizes are plain decimal digits: no sign, no spaces, nothing that overflows a `u64`.
fn parse_size(s: &str) -> Result<u64, HeaderError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HeaderError::Size(s.chars().take(32).collect()));
    }
    s.parse()
        .map_err(|_| HeaderError::Size(s.chars().take(32).collect()))
}

impl UploadHeader {
    /// Parses an upload header line (without its `\n`; a trailing `\r` is tolerated).
    pub fn parse(line: &[u8]) -> Result<Self, HeaderError> {
        let line = std::str::from_utf8(line).map_err(|_| HeaderError::NotUtf8)?;
        let line = line.strip_suffix('\r').unwrap_or(line);
        let fields: Vec<&str> = line.split('|').collect();
        let [sender, target, filename, size] = fields[..] else {
            return Err(HeaderError::FieldCount(fields.len()));
        };
        let size = parse_size(size)?;
        let (sender, filename) = (
            normalize(sender).into_owned(),
            normalize(filename).into_owned(),
        );
        check_username(&sender)?;
        let target = match target.strip_prefix(GROUP_PREFIX) {
            Some(group) => {
                let group = normalize(group).into_owned();
                check_group(&group)?;
                Target::Group(group)
            }
            None => {
                let user = normalize(target).into_owned();
                check_username(&user)?;
                Target::User(user)
            }
        };
        check_filename(&filename)?;
        Ok(Self {
            sender,
            target,
            filename,
            size,
        })
    }

    /// The header line as sent, with its `\n`.
    pub fn to_wire(&self) -> String {
        format!(
            "{}|{}|{}|{}\n",
            self.sender, self.target, self.filename, self.size
        )
    }

    /// How many body bytes follow a refused header, when its last `|`-separated field is a
    /// valid size (whatever is wrong before it), so the server can skip exactly them and
    /// stay in step.
    pub fn declared_size(line: &[u8]) -> Option<u64> {
        let line = String::from_utf8_lossy(line);
        let line = line.strip_suffix('\r').unwrap_or(&line);
        let (_, size) = line.rsplit_once('|')?;
        parse_size(size).ok()
    }
}

/// A forward header: what a recipient's file connection is told before the bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardHeader {
    /// The original sender.
    pub sender: String,
    /// The file's bare name.
    pub filename: String,
    /// Exactly how many bytes follow.
    pub size: u64,
}

impl ForwardHeader {
    fn fields(line: &[u8]) -> Result<(&str, &str, &str), HeaderError> {
        let line = std::str::from_utf8(line)
            .map_err(|_| HeaderError::NotUtf8)?
            .trim();
        let fields: Vec<&str> = line.split('|').collect();
        match fields[..] {
            [sender, filename, size] | [sender, _, filename, size] => Ok((sender, filename, size)),
            _ => Err(HeaderError::FieldCount(fields.len())),
        }
    }

    /// How many body bytes follow a refused forward header, when it still says so clearly,
    /// so a client can skip exactly them and stay in step.
    pub fn declared_size(line: &[u8]) -> Option<u64> {
        Self::fields(line)
            .ok()
            .and_then(|(_, _, size)| parse_size(size).ok())
    }

    /// The header line as sent, with its `\n`.
    pub fn to_wire(&self) -> String {
        format!("{}|{}|{}\n", self.sender, self.filename, self.size)
    }

    /// Parses a forward header as a client does: three fields, or four (an upload-shaped
    /// header, whose target is ignored) as the lab's client accepts. Both names must be safe
    /// path components, so a hostile server cannot steer a client's write outside its
    /// download directory; the sender may hold spaces (the lab's server allows them).
    pub fn parse(line: &[u8]) -> Result<Self, HeaderError> {
        let (sender, filename, size) = Self::fields(line)?;
        let size = parse_size(size)?;
        check_component(sender, "sender name")?;
        check_filename(filename)?;
        Ok(Self {
            sender: sender.to_owned(),
            filename: filename.to_owned(),
            size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_headers_parse() {
        let h = UploadHeader::parse(b"yasser|ahmad|report.pdf|12345").expect("valid");
        assert_eq!(h.sender, "yasser");
        assert_eq!(h.target, Target::User("ahmad".into()));
        assert_eq!(h.filename, "report.pdf");
        assert_eq!(h.size, 12345);
        assert_eq!(h.to_wire(), "yasser|ahmad|report.pdf|12345\n");
        let g = UploadHeader::parse(b"yasser|GROUP:team|slides.pptx|0\r").expect("valid");
        assert_eq!(g.target, Target::Group("team".into()));
        assert_eq!(g.to_wire(), "yasser|GROUP:team|slides.pptx|0\n");
    }

    #[test]
    fn bad_upload_headers_say_why() {
        let err = |line: &[u8]| UploadHeader::parse(line).expect_err("invalid").to_string();
        assert_eq!(
            err(b"a|b|c"),
            "invalid file header: expected sender|target|filename|filesize, got 3 field(s)"
        );
        assert!(err(b"a|b|c|d|5").contains("got 5 field(s)"));
        assert_eq!(
            err(b"a|b|c|lots"),
            "invalid file header: filesize 'lots' is not a whole number of bytes"
        );
        for size in ["-1", "+1", " 1", "1.0", "", "99999999999999999999999"] {
            let line = format!("a|b|c|{size}");
            assert!(matches!(
                UploadHeader::parse(line.as_bytes()),
                Err(HeaderError::Size(_))
            ));
        }
        assert_eq!(
            UploadHeader::parse(b"a|b|\xff|1"),
            Err(HeaderError::NotUtf8)
        );
        assert!(matches!(
            UploadHeader::parse(b"a|b|../x|1"),
            Err(HeaderError::Name(_))
        ));
        assert!(matches!(
            UploadHeader::parse(b"a|GROUP:|x|1"),
            Err(HeaderError::Name(_))
        ));
        assert!(matches!(
            UploadHeader::parse(b"|b|x|1"),
            Err(HeaderError::Name(_))
        ));
    }

    #[test]
    fn a_refused_header_still_tells_its_size_when_it_can() {
        assert_eq!(UploadHeader::declared_size(b"a|b|../x|42"), Some(42));
        assert_eq!(UploadHeader::declared_size(b"a|b|x|-1"), None);
        assert_eq!(UploadHeader::declared_size(b"a|b|x"), None);
        assert_eq!(UploadHeader::declared_size(b"\xff|b|x|1"), Some(1));
        assert_eq!(UploadHeader::declared_size(b"a|b|c|d.txt|5"), Some(5));
        assert_eq!(UploadHeader::declared_size(b"garbage"), None);
    }

    #[test]
    fn forward_headers_round_trip_and_accept_four_fields() {
        let f = ForwardHeader {
            sender: "yasser".into(),
            filename: "report.pdf".into(),
            size: 7,
        };
        assert_eq!(f.to_wire(), "yasser|report.pdf|7\n");
        assert_eq!(ForwardHeader::parse(f.to_wire().as_bytes()), Ok(f.clone()));
        assert_eq!(ForwardHeader::parse(b"yasser|ahmad|report.pdf|7"), Ok(f));
        assert!(ForwardHeader::parse(b"FILE_SOCKET_CONNECTED").is_err());
        assert!(ForwardHeader::parse(b"evil|/etc/passwd|7").is_err());
        assert!(ForwardHeader::parse(b"evil|..|7").is_err());
        assert!(ForwardHeader::parse(b"../evil|x|7").is_err());
        let spaced = ForwardHeader::parse(b"bob smith|a b.txt|7").expect("lab names");
        assert_eq!(spaced.sender, "bob smith");
        assert_eq!(ForwardHeader::declared_size(b"evil|/etc/passwd|7"), Some(7));
        assert_eq!(ForwardHeader::declared_size(b"x|y|z|w|7"), None);
    }
}

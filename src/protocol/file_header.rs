//! The file port's headers.
//!
//! Upload, client to server: `sender|target|filename|filesize\n` and then exactly
//! `filesize` bytes; `target` is a username or `GROUP:<group>`.
//! Forward, server to recipient: `sender|filename|filesize\n` and then the bytes.
//!
//! Between our client and our server only (a session that said hello), either header may
//! end in one more field of options: `b3`, the body is followed by a [`Trailer`] line
//! carrying its BLAKE3 hash (and an upload waits for the server's go-ahead before its
//! body); with it, `zstd`, the body is one zstd frame of the bytes (docs/PROTOCOL.md §9).

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
    /// An option field this side does not know.
    #[error("invalid file header: unknown option '{0}'")]
    Option(String),
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
    /// A BLAKE3 trailer follows the body, which waits for the server's go-ahead (option
    /// `b3`; our client and server only).
    pub checked: bool,
    /// The body is one zstd frame of the file's bytes (option `zstd`, only with `b3`).
    pub compressed: bool,
}

/// The option that asks for a BLAKE3 trailer after the body.
const CHECKED: &str = "b3";
/// The option that says the body is compressed.
const ZSTD: &str = "zstd";

/// The options of a header's last field.
#[derive(Debug, Default, PartialEq, Eq)]
struct Options {
    /// `b3`: a BLAKE3 trailer follows the body.
    checked: bool,
    /// `zstd`: the body is one zstd frame.
    compressed: bool,
    /// `id=<n>` (forwards): the file's id, for resuming it.
    id: Option<u64>,
    /// `at=<n>` (forwards): the body starts at this byte of the file.
    at: u64,
}

/// Parses an options field: comma-separated words, each of which must be known.
fn parse_options(field: &str) -> Result<Options, HeaderError> {
    let mut options = Options::default();
    let unknown = |word: &str| HeaderError::Option(word.chars().take(32).collect());
    for word in field.split(',') {
        let number = |value: &str| value.parse::<u64>().map_err(|_| unknown(word));
        match word.split_once('=') {
            None if word == CHECKED => options.checked = true,
            None if word == ZSTD => options.compressed = true,
            Some(("id", value)) => options.id = Some(number(value)?),
            Some(("at", value)) => options.at = number(value)?,
            _ => return Err(unknown(word)),
        }
    }
    // A compressed body ends where its frame does: only a trailer puts it back in step.
    if options.compressed && !options.checked {
        return Err(unknown(ZSTD));
    }
    Ok(options)
}

/// The options field of a header, with its leading `|` (empty when there are none).
fn options_suffix(checked: bool, compressed: bool, id: Option<u64>, at: u64) -> String {
    if !checked {
        return String::new();
    }
    let mut field = format!("|{CHECKED}");
    if compressed {
        field.push_str(&format!(",{ZSTD}"));
    }
    if let Some(id) = id {
        field.push_str(&format!(",id={id}"));
    }
    if at > 0 {
        field.push_str(&format!(",at={at}"));
    }
    field
}

/// What follows a checked body: the hash it must have, or why the sender (the server, for
/// a forward whose upload failed) gave up on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trailer {
    /// `b3 <64 hex digits>`: the body's BLAKE3 hash.
    Hash(String),
    /// `failed <reason>`: the file is not good; the receiver drops it.
    Failed(String),
}

impl Trailer {
    /// Parses a trailer line (without its `\n`).
    pub fn parse(line: &[u8]) -> Option<Trailer> {
        let line = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
        if let Some(reason) = line.strip_prefix("failed ") {
            return Some(Trailer::Failed(reason.to_owned()));
        }
        let hex = line.strip_prefix("b3 ")?;
        let valid = hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit());
        valid.then(|| Trailer::Hash(hex.to_ascii_lowercase()))
    }

    /// The line as sent, with its `\n`.
    pub fn to_wire(&self) -> String {
        match self {
            Trailer::Hash(hex) => format!("b3 {hex}\n"),
            Trailer::Failed(reason) => format!("failed {}\n", reason.replace(['\n', '\r'], " ")),
        }
    }
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
        let (sender, target, filename, size, options) = match fields[..] {
            [sender, target, filename, size] => {
                (sender, target, filename, size, Options::default())
            }
            [sender, target, filename, size, options] => match parse_options(options)? {
                options @ Options {
                    id: None, at: 0, ..
                } => (sender, target, filename, size, options),
                _ => return Err(HeaderError::Option(options.chars().take(32).collect())),
            },
            _ => return Err(HeaderError::FieldCount(fields.len())),
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
            checked: options.checked,
            compressed: options.compressed,
        })
    }

    /// The header line as sent, with its `\n`.
    pub fn to_wire(&self) -> String {
        format!(
            "{}|{}|{}|{}{}\n",
            self.sender,
            self.target,
            self.filename,
            self.size,
            options_suffix(self.checked, self.compressed, None, 0)
        )
    }

    /// Whether a header line carries an options field (five fields): such an upload, from
    /// our client, sends no body until the server's go-ahead, so a refusal skips nothing.
    pub fn has_options(line: &[u8]) -> bool {
        line.split(|b| *b == b'|').count() == 5
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
    /// A BLAKE3 trailer follows the body (option `b3`, for our client only).
    pub checked: bool,
    /// The body is one zstd frame of the file's bytes from `at` (option `zstd`, with `b3`).
    pub compressed: bool,
    /// The file's id (`id=<n>`, with `b3`): what the client names to resume it.
    pub id: Option<u64>,
    /// The body starts at this byte of the file (`at=<n>`, a resumed forward: the client
    /// has the bytes before it); the body is `size - at` bytes.
    pub at: u64,
}

impl ForwardHeader {
    /// The fields of a forward header: `sender|filename|size`, with options
    /// (`sender|filename|size|b3`), or upload-shaped (`sender|target|filename|size`, whose
    /// last field is a size).
    fn fields(line: &[u8]) -> Result<(&str, &str, &str, Option<&str>), HeaderError> {
        let line = std::str::from_utf8(line)
            .map_err(|_| HeaderError::NotUtf8)?
            .trim();
        let fields: Vec<&str> = line.split('|').collect();
        match fields[..] {
            [sender, filename, size] => Ok((sender, filename, size, None)),
            [sender, _, filename, size] if parse_size(size).is_ok() => {
                Ok((sender, filename, size, None))
            }
            [sender, filename, size, options] => Ok((sender, filename, size, Some(options))),
            _ => Err(HeaderError::FieldCount(fields.len())),
        }
    }

    /// How many body bytes follow a refused forward header, when it still says so clearly,
    /// so a client can skip exactly them and stay in step (never for a compressed body,
    /// whose length on the wire no header says).
    pub fn declared_size(line: &[u8]) -> Option<u64> {
        let (_, _, size, options) = Self::fields(line).ok()?;
        let at = match options.map(parse_options) {
            Some(Ok(options)) if !options.compressed => options.at,
            Some(_) => return None,
            None => 0,
        };
        parse_size(size).ok()?.checked_sub(at)
    }

    /// Whether a forward header (valid or not) announces a trailer after its body.
    pub fn declares_trailer(line: &[u8]) -> bool {
        Self::declares(line, CHECKED)
    }

    /// Whether a forward header (valid or not) announces a compressed body.
    pub fn declares_compressed(line: &[u8]) -> bool {
        Self::declares(line, ZSTD)
    }

    fn declares(line: &[u8], option: &str) -> bool {
        let options = Self::fields(line)
            .ok()
            .and_then(|(_, _, _, options)| options);
        options.is_some_and(|o| o.split(',').any(|w| w == option))
    }

    /// How many bytes of the file the body carries (compressed, fewer go on the wire).
    pub fn body(&self) -> u64 {
        self.size - self.at
    }

    /// The header line as sent, with its `\n`.
    pub fn to_wire(&self) -> String {
        format!(
            "{}|{}|{}{}\n",
            self.sender,
            self.filename,
            self.size,
            options_suffix(self.checked, self.compressed, self.id, self.at)
        )
    }

    /// Parses a forward header as a client does: three fields, or four (an upload-shaped
    /// header, whose target is ignored) as the lab's client accepts. Both names must be safe
    /// path components, so a hostile server cannot steer a client's write outside its
    /// download directory; the sender may hold spaces (the lab's server allows them).
    pub fn parse(line: &[u8]) -> Result<Self, HeaderError> {
        let (sender, filename, size, options) = Self::fields(line)?;
        let size = parse_size(size)?;
        let options = options.map(parse_options).transpose()?.unwrap_or_default();
        check_component(sender, "sender name")?;
        check_filename(filename)?;
        if options.at > size {
            return Err(HeaderError::Option(format!("at={}", options.at)));
        }
        Ok(Self {
            sender: sender.to_owned(),
            filename: filename.to_owned(),
            size,
            checked: options.checked,
            compressed: options.compressed,
            id: options.id,
            at: options.at,
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
        assert!(err(b"a|b|c|d|e|5").contains("got 6 field(s)"));
        assert_eq!(
            err(b"a|b|c|5|zz"),
            "invalid file header: unknown option 'zz'"
        );
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
            checked: false,
            compressed: false,
            id: None,
            at: 0,
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

    #[test]
    fn compressed_bodies_are_declared_and_need_a_trailer() {
        let up = UploadHeader::parse(b"a|bob|f.txt|5|b3,zstd").expect("valid");
        assert!(up.checked && up.compressed);
        assert_eq!(up.to_wire(), "a|bob|f.txt|5|b3,zstd\n");
        assert!(
            UploadHeader::parse(b"a|bob|f.txt|5|zstd").is_err(),
            "no trailer"
        );
        let fwd = ForwardHeader::parse(b"a|f.txt|5|b3,zstd,id=3,at=1").expect("valid");
        assert!(fwd.compressed);
        assert_eq!(fwd.to_wire(), "a|f.txt|5|b3,zstd,id=3,at=1\n");
        // Its length on the wire is the frame's: no header can say it.
        assert_eq!(ForwardHeader::declared_size(b"a|f.txt|5|b3,zstd"), None);
        assert!(ForwardHeader::declares_compressed(b"../x|f|5|b3,zstd"));
        assert!(!ForwardHeader::declares_compressed(b"a|f|5|b3"));
    }

    #[test]
    fn checked_headers_and_trailers_round_trip() {
        let up = UploadHeader::parse(b"a|GROUP:g|f.txt|5|b3").expect("valid");
        assert!(up.checked);
        assert_eq!(up.to_wire(), "a|GROUP:g|f.txt|5|b3\n");
        assert!(UploadHeader::has_options(b"a|b|f|5|b3"));
        assert!(!UploadHeader::has_options(b"a|b|f|5"));
        let fwd = ForwardHeader {
            sender: "a".into(),
            filename: "f.txt".into(),
            size: 5,
            checked: true,
            compressed: false,
            id: None,
            at: 0,
        };
        assert_eq!(fwd.to_wire(), "a|f.txt|5|b3\n");
        assert_eq!(ForwardHeader::parse(b"a|f.txt|5|b3"), Ok(fwd.clone()));
        let resumed = ForwardHeader {
            id: Some(42),
            at: 3,
            ..fwd
        };
        assert_eq!(resumed.to_wire(), "a|f.txt|5|b3,id=42,at=3\n");
        assert_eq!(
            ForwardHeader::parse(b"a|f.txt|5|b3,id=42,at=3"),
            Ok(resumed.clone())
        );
        assert_eq!(resumed.body(), 2);
        assert_eq!(
            ForwardHeader::declared_size(b"a|f.txt|5|b3,id=42,at=3"),
            Some(2)
        );
        assert!(
            ForwardHeader::parse(b"a|f.txt|5|b3,at=6").is_err(),
            "past the end"
        );
        assert!(
            UploadHeader::parse(b"a|b|f.txt|5|b3,id=1").is_err(),
            "not in uploads"
        );
        assert_eq!(
            ForwardHeader::parse(b"a|f.txt|5|zz"),
            Err(HeaderError::Option("zz".into()))
        );
        let hash = blake3::hash(b"hello").to_hex().to_string();
        let t = Trailer::Hash(hash.clone());
        assert_eq!(Trailer::parse(t.to_wire().trim_end().as_bytes()), Some(t));
        let upper = format!("b3 {}", hash.to_ascii_uppercase());
        assert_eq!(Trailer::parse(upper.as_bytes()), Some(Trailer::Hash(hash)));
        let failed = Trailer::Failed("bad\nthing".into());
        assert_eq!(failed.to_wire(), "failed bad thing\n");
        assert_eq!(
            Trailer::parse(b"failed bad thing"),
            Some(Trailer::Failed("bad thing".into()))
        );
        assert_eq!(Trailer::parse(b"b3 1234"), None);
        assert_eq!(Trailer::parse(b"a|f|5"), None);
    }
}

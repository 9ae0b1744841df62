//! Property tests ("fuzzing") of every parser in this module, with proptest.
//!
//! A short run is part of `cargo test` (`PROPTEST_CASES`, default 512 per property). The
//! long run is documented in docs/SECURITY.md:
//! `PROPTEST_CASES=1000000 cargo test --release protocol::fuzz` (54 s on 2 cores).
//! Every parser also runs over the committed seed corpus `fuzz/seeds/*` (hostile inputs
//! found or written by hand). A failing case proptest finds is added there as a seed file.

use bytes::BytesMut;
use proptest::prelude::*;

use super::command::{format_command, parse_command};
use super::file_header::{ForwardHeader, Target, UploadHeader};
use super::framing::LineFramer;
use super::server_line::ServerLine;

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(512);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Runs every parser over `input`; none may panic.
fn parse_everything(input: &[u8]) {
    let text = String::from_utf8_lossy(input);
    let _ = parse_command(&text);
    let _ = ServerLine::parse(&text);
    let _ = UploadHeader::parse(input);
    let _ = UploadHeader::declared_size(input);
    let _ = ForwardHeader::parse(input);
    let _ = ForwardHeader::declared_size(input);
    for max in [0, 1, 7, 4096] {
        let mut framer = LineFramer::new(max);
        let mut buf = BytesMut::from(input);
        while let Ok(Some(line)) = framer.next_line(&mut buf) {
            assert!(line.len() <= max);
        }
        let _ = framer.take_idle_line(&mut buf);
    }
}

#[test]
fn the_seed_corpus_breaks_no_parser() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("fuzz/seeds exists") {
        let bytes = std::fs::read(entry.expect("entry").path()).expect("readable seed");
        parse_everything(&bytes);
        for cut in 0..bytes.len().min(64) {
            parse_everything(&bytes[..cut]);
        }
        seen += 1;
    }
    assert!(seen >= 10, "the seed corpus has only {seen} files");
}

/// Valid user, group and file names.
fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_.-]{1,16}".prop_filter("a valid name", |n| super::names::check_username(n).is_ok())
}

fn text() -> impl Strategy<Value = String> {
    "[ -~]{0,40}"
        .prop_map(|t| t.trim().to_owned())
        .prop_filter("not empty", |t| !t.is_empty())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn no_parser_panics_on_arbitrary_bytes(input in proptest::collection::vec(any::<u8>(), 0..600)) {
        parse_everything(&input);
    }

    #[test]
    fn lines_survive_any_chunking(
        lines in proptest::collection::vec("[^\r\n]{0,30}", 1..12),
        crlf in any::<bool>(),
        cuts in proptest::collection::vec(1usize..40, 1..40),
    ) {
        let ending = if crlf { "\r\n" } else { "\n" };
        let stream: String = lines.iter().map(|l| format!("{l}{ending}")).collect();
        let bytes = stream.as_bytes();
        let mut framer = LineFramer::new(4096);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let (mut at, mut cut) = (0, cuts.iter().cycle());
        while at < bytes.len() {
            let end = (at + cut.next().copied().unwrap_or(1)).min(bytes.len());
            buf.extend_from_slice(&bytes[at..end]);
            at = end;
            while let Some(line) = framer.next_line(&mut buf).expect("within limits") {
                got.push(String::from_utf8(line.to_vec()).expect("utf8 in, utf8 out"));
            }
        }
        prop_assert_eq!(got, lines);
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn the_framer_never_buffers_past_its_limit(
        input in proptest::collection::vec(any::<u8>(), 0..2000),
        max in 1usize..200,
        chunk in 1usize..300,
    ) {
        let mut framer = LineFramer::new(max);
        let mut buf = BytesMut::new();
        for piece in input.chunks(chunk) {
            buf.extend_from_slice(piece);
            loop {
                match framer.next_line(&mut buf) {
                    Ok(Some(line)) => prop_assert!(line.len() <= max),
                    Ok(None) => break,
                    Err(_) => return Ok(()),
                }
            }
            // What stays buffered is at most one partial line, within the limit.
            prop_assert!(buf.len() <= max);
        }
    }

    #[test]
    fn commands_round_trip(to in name(), group in name(), body in text(), which in 0usize..super::COMMANDS.len()) {
        let spec = super::COMMANDS[which];
        let first = if spec.name == "msg" { &to } else { &group };
        let args = match spec.args {
            0 => vec![],
            1 if matches!(spec.name, "join" | "leave" | "members") => vec![group.as_str()],
            1 => vec![body.as_str()],
            _ => vec![first.as_str(), body.as_str()],
        };
        let wire = format_command(spec, &args);
        let parsed = parse_command(wire.trim_end_matches('\n'));
        let Ok(super::Parsed::Call(call)) = parsed else {
            return Err(TestCaseError::fail(format!("{wire:?} parsed as {parsed:?}")));
        };
        prop_assert!(call.is(spec));
        prop_assert_eq!(&call.args[..spec.args], &args[..]);
    }

    #[test]
    fn upload_headers_round_trip(
        sender in "[a-z0-9_]{1,16}",
        target in "(GROUP:)?[a-z0-9_]{1,16}",
        filename in "[a-zA-Z0-9 _.()-]{0,30}[a-zA-Z0-9]",
        size in any::<u64>(),
    ) {
        let header = UploadHeader::parse(format!("{sender}|{target}|{filename}|{size}").as_bytes())
            .expect("a valid header");
        prop_assert_eq!(&header.sender, &sender);
        prop_assert_eq!(header.target.to_string(), target.clone());
        prop_assert_eq!(matches!(header.target, Target::Group(_)), target.starts_with("GROUP:"));
        prop_assert_eq!(header.size, size);
        let wire = header.to_wire();
        prop_assert_eq!(UploadHeader::parse(wire.trim_end().as_bytes()), Ok(header));
    }

    #[test]
    fn forward_headers_round_trip(sender in name(), filename in "[a-zA-Z0-9 _.()-]{0,30}[a-z]", size in any::<u64>(), checked in any::<bool>(), compressed in any::<bool>(), id in any::<u64>(), at in any::<u64>()) {
        let (compressed, id, at) = match checked {
            true => (compressed, Some(id), at % size.saturating_add(1)),
            false => (false, None, 0),
        };
        let header = ForwardHeader { sender, filename, size, checked, compressed, id, at };
        prop_assert_eq!(ForwardHeader::parse(header.to_wire().as_bytes()), Ok(header));
    }

    #[test]
    fn forward_headers_never_name_a_path(line in "[ -~]{0,60}") {
        if let Ok(header) = ForwardHeader::parse(line.as_bytes()) {
            let saved = super::saved_name(&header.sender, &header.filename);
            prop_assert!(!saved.contains('/') && !saved.contains('\\'));
            prop_assert!(header.filename != ".." && header.filename != ".");
        }
    }

    #[test]
    fn server_lines_round_trip(a in name(), b in name(), body in text(), size in any::<u64>(), users in proptest::collection::vec(name(), 0..5), which in 0usize..14) {
        let s = |v: &String| v.clone();
        let line = match which {
            0 => ServerLine::Welcome { user: s(&a) },
            1 => ServerLine::Private { from: s(&a), text: s(&body) },
            2 => ServerLine::Broadcast { from: s(&a), text: s(&body) },
            3 => ServerLine::Group { group: s(&b), from: s(&a), text: s(&body) },
            4 => ServerLine::Joined { group: s(&b) },
            5 => ServerLine::NotInGroup { group: s(&b) },
            6 => ServerLine::Users { users },
            7 => ServerLine::UserNotFound { user: s(&a) },
            8 => ServerLine::FileIncoming { from: s(&a), filename: s(&b), size },
            9 => ServerLine::FileToGroup { from: s(&a), filename: s(&body), group: s(&b) },
            10 => ServerLine::FileSelf { filename: s(&body), saved_as: s(&b) },
            11 => ServerLine::NoFileSocket { user: s(&a), saved_as: s(&b) },
            12 => ServerLine::Ack { recipient: s(&a), filename: s(&body) },
            _ => ServerLine::Error { reason: s(&body) },
        };
        prop_assert_eq!(ServerLine::parse(&line.to_string()), line);
    }
}

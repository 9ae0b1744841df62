//! Every line the server sends on the chat port: one formatter (server side) and one parser
//! (client side) per line, so the two can never drift apart.
//!
//! The texts are the lab's, byte for byte. Lines the lab did not have are the two extra
//! usage lines (each command's [`super::command::Spec::usage`]) and `ERROR: <reason>`.

use std::fmt::{self, Display, Write as _};

use super::command::{Spec, COMMANDS, HELLO};

/// A private message's line is `<PRIVATE_HEAD><from><PRIVATE_SEP><text>`: written by
/// `Display` and `ServerLine::private_wire`, read by `parse`.
const PRIVATE_HEAD: &str = "[PRIVATE from ";
const PRIVATE_SEP: &str = "]: ";

/// The lab's reply to a line that is no command.
pub const UNKNOWN_COMMAND: &str = "Unknown command. Use msg/broadcast/list/join/send_group";

/// One line from the server's chat port, without its `\n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerLine {
    /// `Welcome, <u>!`: the username was accepted.
    Welcome {
        /// The accepted username.
        user: String,
    },
    /// `[PRIVATE from <u>]: <m>`.
    Private {
        /// Sender.
        from: String,
        /// Message.
        text: String,
    },
    /// `[BROADCAST from <u>]: <m>`.
    Broadcast {
        /// Sender.
        from: String,
        /// Message.
        text: String,
    },
    /// `[GROUP <g>] <u>: <m>`.
    Group {
        /// Group.
        group: String,
        /// Sender.
        from: String,
        /// Message.
        text: String,
    },
    /// `You joined group '<g>'`.
    Joined {
        /// Group.
        group: String,
    },
    /// `You left group '<g>'` (not in the lab).
    Left {
        /// Group.
        group: String,
    },
    /// `Your groups: a, b` (not in the lab): the groups one is in, in order of joining.
    Groups {
        /// The groups.
        groups: Vec<String>,
    },
    /// `Members of '<g>': a, b` (not in the lab), in order of joining.
    Members {
        /// Group.
        group: String,
        /// Its members.
        members: Vec<String>,
    },
    /// `You are not in group '<g>'`.
    NotInGroup {
        /// Group.
        group: String,
    },
    /// `Connected users: a, b` (everyone but the one who asked, in order of arrival).
    Users {
        /// The other users.
        users: Vec<String>,
    },
    /// `User <u> not found.`
    UserNotFound {
        /// The name that was asked for.
        user: String,
    },
    /// A command's usage line: it lacked arguments.
    Usage(&'static Spec),
    /// The lab's unknown-command line.
    UnknownCommand,
    /// `[FILE] <s> sent you file '<f>' (<n> bytes). Incoming on file socket.`
    FileIncoming {
        /// Sender.
        from: String,
        /// File name as forwarded.
        filename: String,
        /// Size in bytes.
        size: u64,
    },
    /// `[FILE] <s> sent file '<f>' to group '<g>'.`
    FileToGroup {
        /// Sender.
        from: String,
        /// File name as forwarded.
        filename: String,
        /// Group.
        group: String,
    },
    /// `[FILE] You sent file '<f>' (saved as <saved>).`: a file sent to oneself.
    FileSelf {
        /// File name.
        filename: String,
        /// Name of the server's copy.
        saved_as: String,
    },
    /// `User <t> has no file socket; file saved as <saved>`.
    NoFileSocket {
        /// The recipient without a file connection.
        user: String,
        /// Name of the server's copy.
        saved_as: String,
    },
    /// `[ACK] <r> received file '<f>'`.
    Ack {
        /// Who received the file.
        recipient: String,
        /// File name.
        filename: String,
    },
    /// `[HELP] <usage> - <what it does>`: one command, in the answer to `help` (built-in
    /// commands first, then the server's own).
    Help {
        /// How to call it, e.g. `msg <username> <message>`.
        usage: String,
        /// One line on what it does.
        help: String,
    },
    /// `[SERVER] <text>`: a message from the server itself (its operator, or a plugin).
    FromServer {
        /// What it says.
        text: String,
    },
    /// `[HELLO] relaychat/1`: the answer to the client's [`super::command::HELLO`]; the
    /// extension lines below are sent to this client from now on.
    Hello,
    /// `[UPLOAD OK] <saved_as>` (extension): the server has the whole of the client's
    /// last upload, saved as `saved_as`. One per upload, in order.
    UploadOk {
        /// Name of the server's copy.
        saved_as: String,
    },
    /// `[UPLOAD FAILED] <reason>` (extension): the client's last upload was refused or
    /// broke off. One per upload, in order.
    UploadFailed {
        /// Why.
        reason: String,
    },
    /// `[UPLOAD READY] <offset>` (extension): the server takes the client's checked upload
    /// (option `b3`) and wants its body from byte `offset` on; past 0 (it kept that much
    /// of a broken upload), followed by the BLAKE3 hash of those bytes, which the client
    /// checks against its file before it answers `from <offset>` (or `from 0`).
    UploadReady {
        /// The first byte the server wants.
        offset: u64,
        /// The hash of the bytes before `offset` (none when it is 0).
        prefix: Option<String>,
    },
    /// `[UPLOAD KEPT] <have>` (extension): the client's last upload broke off with its file
    /// connection after `have` bytes, which the server keeps: sending it again resumes it.
    UploadKept {
        /// Bytes kept.
        have: u64,
    },
    /// `[RESUME FAILED] <id> <reason>` (extension): the file the client asked to resume
    /// (`resume <id> <have>` on its file connection) cannot be; it drops its part.
    ResumeFailed {
        /// The file's id.
        id: u64,
        /// Why.
        reason: String,
    },
    /// `Password for <u>:`: the name is registered; the next line is its password.
    PasswordPrompt {
        /// The registered name.
        user: String,
    },
    /// `Registered <u>.`: the name now belongs to its user.
    Registered {
        /// The name.
        user: String,
    },
    /// `Password changed.`
    PasswordChanged,
    /// `User <u> is offline; message queued.`: kept for a registered user's next login.
    MessageQueued {
        /// The recipient.
        user: String,
    },
    /// `User <u> is offline; file queued.`: forwarded at a registered user's next login.
    FileQueued {
        /// The recipient.
        user: String,
    },
    /// `[FILES #<id>] <time> <sender> -> <target>: '<name>' (<n> bytes, blake3 <hex>)`: one
    /// file of the index.
    FileEntry {
        /// Its id (for `get`).
        id: u64,
        /// When it was saved (UTC, ISO 8601).
        at: String,
        /// Who sent it.
        sender: String,
        /// Where it went (`bob` or `GROUP:devs`).
        target: String,
        /// Its name as sent.
        filename: String,
        /// Its size in bytes.
        size: u64,
        /// Its BLAKE3 hash in hex (`-` if it was saved before hashes were kept).
        blake3: String,
    },
    /// `[FILES END] <n> files`.
    FilesEnd {
        /// How many were listed.
        count: usize,
    },
    /// `[HISTORY <time>] <u>: <m>`: one message of a conversation (time in UTC, ISO 8601).
    History {
        /// When the server accepted it (`2026-11-29T14:00:00Z`).
        at: String,
        /// Who wrote it.
        from: String,
        /// What it said.
        text: String,
    },
    /// `[HISTORY END] <n> messages`: the end of a `history` answer.
    HistoryEnd {
        /// How many messages it had.
        count: usize,
    },
    /// `[QUEUED <time>]` (extension): the next line is a message kept while the user was
    /// away, sent at that time (UTC, ISO 8601).
    QueuedAt {
        /// When it was sent.
        at: String,
    },
    /// `[INBOX] <id>` (extension): every queued message up to inbox entry `id` has been
    /// sent; the client confirms with `INBOX_RECEIVED|<id>` once it has them.
    InboxSent {
        /// The last inbox entry sent.
        upto: u64,
    },
    /// `[SESSION] <token>` (extension): proves this user's file connection.
    Session {
        /// The secret (hex).
        token: String,
    },
    /// `ERROR: <reason>`: a refused request, a limit, a bad header (not in the lab).
    Error {
        /// Human-readable reason.
        reason: String,
    },
    /// Anything else (parse only): shown to the user as it came.
    Other(String),
}

impl Display for ServerLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerLine::Welcome { user } => write!(f, "Welcome, {user}!"),
            ServerLine::Private { from, text } => {
                write!(f, "{PRIVATE_HEAD}{from}{PRIVATE_SEP}{text}")
            }
            ServerLine::Broadcast { from, text } => write!(f, "[BROADCAST from {from}]: {text}"),
            ServerLine::Group { group, from, text } => write!(f, "[GROUP {group}] {from}: {text}"),
            ServerLine::Joined { group } => write!(f, "You joined group '{group}'"),
            ServerLine::NotInGroup { group } => write!(f, "You are not in group '{group}'"),
            ServerLine::Left { group } => write!(f, "You left group '{group}'"),
            ServerLine::Users { users } => {
                f.write_str("Connected users: ")?;
                comma_list(f, users)
            }
            ServerLine::Groups { groups } => {
                f.write_str("Your groups: ")?;
                comma_list(f, groups)
            }
            ServerLine::Members { group, members } => {
                write!(f, "Members of '{group}': ")?;
                comma_list(f, members)
            }
            ServerLine::UserNotFound { user } => write!(f, "User {user} not found."),
            ServerLine::Usage(spec) => f.write_str(spec.usage),
            ServerLine::UnknownCommand => f.write_str(UNKNOWN_COMMAND),
            ServerLine::FileIncoming {
                from,
                filename,
                size,
            } => write!(
                f,
                "[FILE] {from} sent you file '{filename}' ({size} bytes). Incoming on file socket."
            ),
            ServerLine::FileToGroup {
                from,
                filename,
                group,
            } => {
                write!(
                    f,
                    "[FILE] {from} sent file '{filename}' to group '{group}'."
                )
            }
            ServerLine::FileSelf { filename, saved_as } => {
                write!(
                    f,
                    "[FILE] You sent file '{filename}' (saved as {saved_as})."
                )
            }
            ServerLine::NoFileSocket { user, saved_as } => {
                write!(
                    f,
                    "User {user} has no file socket; file saved as {saved_as}"
                )
            }
            ServerLine::Ack {
                recipient,
                filename,
            } => {
                write!(f, "[ACK] {recipient} received file '{filename}'")
            }
            ServerLine::Help { usage, help } => write!(f, "[HELP] {usage} - {help}"),
            ServerLine::FromServer { text } => write!(f, "[SERVER] {text}"),
            ServerLine::Hello => write!(f, "[HELLO] {HELLO}"),
            ServerLine::UploadOk { saved_as } => write!(f, "[UPLOAD OK] {saved_as}"),
            ServerLine::UploadFailed { reason } => write!(f, "[UPLOAD FAILED] {reason}"),
            ServerLine::ResumeFailed { id, reason } => write!(f, "[RESUME FAILED] {id} {reason}"),
            ServerLine::UploadKept { have } => write!(f, "[UPLOAD KEPT] {have}"),
            ServerLine::UploadReady { offset, prefix } => match prefix {
                Some(prefix) => write!(f, "[UPLOAD READY] {offset} {prefix}"),
                None => write!(f, "[UPLOAD READY] {offset}"),
            },
            ServerLine::PasswordPrompt { user } => write!(f, "Password for {user}:"),
            ServerLine::Registered { user } => write!(f, "Registered {user}."),
            ServerLine::PasswordChanged => f.write_str("Password changed."),
            ServerLine::MessageQueued { user } => {
                write!(f, "User {user} is offline; message queued.")
            }
            ServerLine::FileQueued { user } => write!(f, "User {user} is offline; file queued."),
            ServerLine::FileEntry {
                id,
                at,
                sender,
                target,
                filename,
                size,
                blake3,
            } => write!(
                f,
                "[FILES #{id}] {at} {sender} -> {target}: '{filename}' ({size} bytes, blake3 {blake3})"
            ),
            ServerLine::FilesEnd { count } => write!(f, "[FILES END] {count} files"),
            ServerLine::History { at, from, text } => write!(f, "[HISTORY {at}] {from}: {text}"),
            ServerLine::HistoryEnd { count } => write!(f, "[HISTORY END] {count} messages"),
            ServerLine::QueuedAt { at } => write!(f, "[QUEUED {at}]"),
            ServerLine::InboxSent { upto } => write!(f, "[INBOX] {upto}"),
            ServerLine::Session { token } => write!(f, "[SESSION] {token}"),
            ServerLine::Error { reason } => write!(f, "ERROR: {reason}"),
            ServerLine::Other(line) => f.write_str(line),
        }
    }
}

fn comma_list(f: &mut fmt::Formatter<'_>, items: &[String]) -> fmt::Result {
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        f.write_str(item)?;
    }
    Ok(())
}

/// `text` made safe to put inside one line: every line break becomes a space (text from
/// a plugin, which must never inject a line of its own).
pub fn one_line(text: &str) -> String {
    text.replace(['\r', '\n'], " ")
}

/// A time as the protocol's lines show it: UTC, ISO 8601, whole seconds
/// (`2026-11-29T14:00:00Z`).
pub fn utc(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// `a, b` → `[a, b]`; the empty string → no items.
fn split_list(rest: &str) -> Vec<String> {
    match rest.is_empty() {
        true => Vec::new(),
        false => rest.split(", ").map(String::from).collect(),
    }
}

impl ServerLine {
    /// `[PRIVATE from <from>]: <text>\n`, ready to send: the line of every private
    /// message, made in one allocation (the same bytes as [`ServerLine::Private`]'s
    /// `to_wire`, without building one).
    pub fn private_wire(from: &str, text: &str) -> bytes::Bytes {
        let len = PRIVATE_HEAD.len() + from.len() + PRIVATE_SEP.len() + text.len() + 1;
        let mut line = Vec::with_capacity(len);
        for part in [PRIVATE_HEAD, from, PRIVATE_SEP, text, "\n"] {
            line.extend_from_slice(part.as_bytes());
        }
        bytes::Bytes::from(line)
    }

    /// The line as sent: its text and one `\n`.
    pub fn to_wire(&self) -> String {
        let mut s = String::with_capacity(64);
        let _ = write!(s, "{self}");
        s.push('\n');
        s
    }

    /// Parses one received line (without its line ending). Never fails: a line that
    /// matches no known shape is [`ServerLine::Other`].
    pub fn parse(line: &str) -> ServerLine {
        parse_known(line).unwrap_or_else(|| ServerLine::Other(line.to_owned()))
    }
}

/// `<prefix><middle><suffix>` → `<middle>`.
fn between<'a>(line: &'a str, prefix: &str, suffix: &str) -> Option<&'a str> {
    line.strip_prefix(prefix)?.strip_suffix(suffix)
}

fn parse_known(line: &str) -> Option<ServerLine> {
    let s = String::from;
    if let Some(user) = between(line, "Welcome, ", "!") {
        return Some(ServerLine::Welcome { user: s(user) });
    }
    if let Some(rest) = line.strip_prefix(PRIVATE_HEAD) {
        let (from, text) = rest.split_once(PRIVATE_SEP)?;
        return Some(ServerLine::Private {
            from: s(from),
            text: s(text),
        });
    }
    if let Some(rest) = line.strip_prefix("[BROADCAST from ") {
        let (from, text) = rest.split_once("]: ")?;
        return Some(ServerLine::Broadcast {
            from: s(from),
            text: s(text),
        });
    }
    if let Some(rest) = line.strip_prefix("[GROUP ") {
        let (group, rest) = rest.split_once("] ")?;
        let (from, text) = rest.split_once(": ")?;
        return Some(ServerLine::Group {
            group: s(group),
            from: s(from),
            text: s(text),
        });
    }
    if let Some(group) = between(line, "You joined group '", "'") {
        return Some(ServerLine::Joined { group: s(group) });
    }
    if let Some(group) = between(line, "You are not in group '", "'") {
        return Some(ServerLine::NotInGroup { group: s(group) });
    }
    if let Some(rest) = line.strip_prefix("Connected users: ") {
        return Some(ServerLine::Users {
            users: split_list(rest),
        });
    }
    if let Some(group) = between(line, "You left group '", "'") {
        return Some(ServerLine::Left { group: s(group) });
    }
    if let Some(rest) = line.strip_prefix("Your groups: ") {
        return Some(ServerLine::Groups {
            groups: split_list(rest),
        });
    }
    if let Some(rest) = line.strip_prefix("Members of '") {
        let (group, members) = rest.split_once("': ")?;
        return Some(ServerLine::Members {
            group: s(group),
            members: split_list(members),
        });
    }
    // Before `User <u> not found.`: a saved file name may itself end in " not found.".
    let no_socket = line
        .strip_prefix("User ")
        .and_then(|rest| rest.split_once(" has no file socket; file saved as "));
    if let Some((user, saved_as)) = no_socket {
        return Some(ServerLine::NoFileSocket {
            user: s(user),
            saved_as: s(saved_as),
        });
    }
    if let Some(user) = between(line, "User ", " is offline; file queued.") {
        return Some(ServerLine::FileQueued { user: s(user) });
    }
    if let Some(user) = between(line, "User ", " is offline; message queued.") {
        return Some(ServerLine::MessageQueued { user: s(user) });
    }
    if let Some(user) = between(line, "User ", " not found.") {
        return Some(ServerLine::UserNotFound { user: s(user) });
    }
    if let Some(spec) = COMMANDS.iter().find(|spec| spec.usage == line) {
        return Some(ServerLine::Usage(spec));
    }
    if line == UNKNOWN_COMMAND {
        return Some(ServerLine::UnknownCommand);
    }
    if let Some(rest) = between(line, "[FILE] You sent file '", ").") {
        let (filename, saved_as) = rest.rsplit_once("' (saved as ")?;
        return Some(ServerLine::FileSelf {
            filename: s(filename),
            saved_as: s(saved_as),
        });
    }
    if let Some(rest) = between(line, "[FILE] ", " bytes). Incoming on file socket.") {
        let (from, rest) = rest.split_once(" sent you file '")?;
        let (filename, size) = rest.rsplit_once("' (")?;
        let size = size.parse().ok()?;
        return Some(ServerLine::FileIncoming {
            from: s(from),
            filename: s(filename),
            size,
        });
    }
    if let Some(rest) = between(line, "[FILE] ", "'.") {
        let (from, rest) = rest.split_once(" sent file '")?;
        let (filename, group) = rest.rsplit_once("' to group '")?;
        return Some(ServerLine::FileToGroup {
            from: s(from),
            filename: s(filename),
            group: s(group),
        });
    }
    if let Some(rest) = between(line, "[ACK] ", "'") {
        let (recipient, filename) = rest.split_once(" received file '")?;
        return Some(ServerLine::Ack {
            recipient: s(recipient),
            filename: s(filename),
        });
    }
    if line.strip_prefix("[HELLO] ") == Some(HELLO) {
        return Some(ServerLine::Hello);
    }
    if let Some((usage, help)) = line
        .strip_prefix("[HELP] ")
        .and_then(|r| r.split_once(" - "))
    {
        return Some(ServerLine::Help {
            usage: s(usage),
            help: s(help),
        });
    }
    if let Some(text) = line.strip_prefix("[SERVER] ") {
        return Some(ServerLine::FromServer { text: s(text) });
    }
    if let Some(saved_as) = line.strip_prefix("[UPLOAD OK] ") {
        return Some(ServerLine::UploadOk {
            saved_as: s(saved_as),
        });
    }
    if let Some(reason) = line.strip_prefix("[UPLOAD FAILED] ") {
        return Some(ServerLine::UploadFailed { reason: s(reason) });
    }
    if let Some(have) = line.strip_prefix("[UPLOAD KEPT] ") {
        return Some(ServerLine::UploadKept {
            have: have.parse().ok()?,
        });
    }
    if let Some(rest) = line.strip_prefix("[RESUME FAILED] ") {
        let (id, reason) = rest.split_once(' ')?;
        return Some(ServerLine::ResumeFailed {
            id: id.parse().ok()?,
            reason: s(reason),
        });
    }
    if let Some(rest) = line.strip_prefix("[UPLOAD READY] ") {
        let (offset, prefix) = match rest.split_once(' ') {
            Some((offset, prefix)) => (offset, Some(s(prefix))),
            None => (rest, None),
        };
        return Some(ServerLine::UploadReady {
            offset: offset.parse().ok()?,
            prefix,
        });
    }
    if let Some(user) = between(line, "Password for ", ":") {
        return Some(ServerLine::PasswordPrompt { user: s(user) });
    }
    if let Some(user) = between(line, "Registered ", ".") {
        return Some(ServerLine::Registered { user: s(user) });
    }
    if line == "Password changed." {
        return Some(ServerLine::PasswordChanged);
    }
    if let Some(count) = between(line, "[FILES END] ", " files") {
        return Some(ServerLine::FilesEnd {
            count: count.parse().ok()?,
        });
    }
    if let Some(rest) = between(line, "[FILES #", ")") {
        let (id, rest) = rest.split_once("] ")?;
        let (at, rest) = rest.split_once(' ')?;
        let (sender, rest) = rest.split_once(" -> ")?;
        let (target, rest) = rest.split_once(": '")?;
        let (filename, rest) = rest.rsplit_once("' (")?;
        let (size, blake3) = rest.split_once(" bytes, blake3 ")?;
        return Some(ServerLine::FileEntry {
            id: id.parse().ok()?,
            at: s(at),
            sender: s(sender),
            target: s(target),
            filename: s(filename),
            size: size.parse().ok()?,
            blake3: s(blake3),
        });
    }
    if let Some(count) = between(line, "[HISTORY END] ", " messages") {
        return Some(ServerLine::HistoryEnd {
            count: count.parse().ok()?,
        });
    }
    if let Some(rest) = line.strip_prefix("[HISTORY ") {
        let (at, rest) = rest.split_once("] ")?;
        let (from, text) = rest.split_once(": ")?;
        return Some(ServerLine::History {
            at: s(at),
            from: s(from),
            text: s(text),
        });
    }
    if let Some(at) = between(line, "[QUEUED ", "]") {
        return Some(ServerLine::QueuedAt { at: s(at) });
    }
    if let Some(upto) = line.strip_prefix("[INBOX] ") {
        return Some(ServerLine::InboxSent {
            upto: upto.parse().ok()?,
        });
    }
    if let Some(token) = line.strip_prefix("[SESSION] ") {
        return Some(ServerLine::Session { token: s(token) });
    }
    if let Some(reason) = line.strip_prefix("ERROR: ") {
        return Some(ServerLine::Error { reason: s(reason) });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_private_line_made_directly_is_the_private_line() {
        for (from, text) in [("alice", "hi bob"), ("ünï", ""), ("b", "a: [PRIVATE x] y")] {
            let line = ServerLine::Private {
                from: from.into(),
                text: text.into(),
            };
            assert_eq!(
                ServerLine::private_wire(from, text),
                line.to_wire().as_bytes()
            );
        }
    }
    use crate::protocol::command::{BROADCAST, JOIN, MSG, SEND_GROUP};

    fn every_line() -> Vec<(ServerLine, &'static str)> {
        let s = String::from;
        vec![
            (
                ServerLine::Welcome { user: s("yasser") },
                "Welcome, yasser!",
            ),
            (
                ServerLine::Private {
                    from: s("yasser"),
                    text: s("Hi Ahmad!"),
                },
                "[PRIVATE from yasser]: Hi Ahmad!",
            ),
            (
                ServerLine::Broadcast {
                    from: s("yasser"),
                    text: s("Hello everyone!"),
                },
                "[BROADCAST from yasser]: Hello everyone!",
            ),
            (
                ServerLine::Group {
                    group: s("devs"),
                    from: s("yasser"),
                    text: s("Standup: 10 AM."),
                },
                "[GROUP devs] yasser: Standup: 10 AM.",
            ),
            (
                ServerLine::Joined { group: s("devs") },
                "You joined group 'devs'",
            ),
            (
                ServerLine::NotInGroup { group: s("devs") },
                "You are not in group 'devs'",
            ),
            (
                ServerLine::Users {
                    users: vec![s("ahmad"), s("sara")],
                },
                "Connected users: ahmad, sara",
            ),
            (ServerLine::Users { users: vec![] }, "Connected users: "),
            (
                ServerLine::UserNotFound { user: s("bob") },
                "User bob not found.",
            ),
            (ServerLine::Usage(&MSG), "Usage: msg <username> <message>"),
            (ServerLine::Usage(&BROADCAST), "Usage: broadcast <message>"),
            (ServerLine::Usage(&JOIN), "Usage: join <group_name>"),
            (
                ServerLine::Usage(&SEND_GROUP),
                "Usage: send_group <group_name> <message>",
            ),
            (
                ServerLine::UnknownCommand,
                "Unknown command. Use msg/broadcast/list/join/send_group",
            ),
            (
                ServerLine::FileIncoming {
                    from: s("yasser"),
                    filename: s("report.pdf"),
                    size: 12345,
                },
                "[FILE] yasser sent you file 'report.pdf' (12345 bytes). Incoming on file socket.",
            ),
            (
                ServerLine::FileToGroup {
                    from: s("yasser"),
                    filename: s("it's (1).pptx"),
                    group: s("team"),
                },
                "[FILE] yasser sent file 'it's (1).pptx' to group 'team'.",
            ),
            (
                ServerLine::FileSelf {
                    filename: s("foo.bin"),
                    saved_as: s("received_from_me_foo.bin"),
                },
                "[FILE] You sent file 'foo.bin' (saved as received_from_me_foo.bin).",
            ),
            (
                ServerLine::NoFileSocket {
                    user: s("bob"),
                    saved_as: s("received_from_a_x"),
                },
                "User bob has no file socket; file saved as received_from_a_x",
            ),
            (
                ServerLine::Ack {
                    recipient: s("ahmad"),
                    filename: s("report.pdf"),
                },
                "[ACK] ahmad received file 'report.pdf'",
            ),
            (
                ServerLine::Error {
                    reason: s("file too big"),
                },
                "ERROR: file too big",
            ),
            (ServerLine::Hello, "[HELLO] relaychat/1"),
            (
                ServerLine::Left { group: s("devs") },
                "You left group 'devs'",
            ),
            (
                ServerLine::Groups {
                    groups: vec![s("devs"), s("ops")],
                },
                "Your groups: devs, ops",
            ),
            (ServerLine::Groups { groups: vec![] }, "Your groups: "),
            (
                ServerLine::Members {
                    group: s("devs"),
                    members: vec![s("alice"), s("bob")],
                },
                "Members of 'devs': alice, bob",
            ),
            (
                ServerLine::UploadOk {
                    saved_as: s("received_from_a_x (2).txt"),
                },
                "[UPLOAD OK] received_from_a_x (2).txt",
            ),
            (
                ServerLine::UploadFailed {
                    reason: s("file too large: 9 bytes (limit 5)"),
                },
                "[UPLOAD FAILED] file too large: 9 bytes (limit 5)",
            ),
            (
                ServerLine::UploadReady {
                    offset: 0,
                    prefix: None,
                },
                "[UPLOAD READY] 0",
            ),
            (
                ServerLine::UploadReady {
                    offset: 5,
                    prefix: Some(s("ab12")),
                },
                "[UPLOAD READY] 5 ab12",
            ),
            (
                ServerLine::ResumeFailed {
                    id: 7,
                    reason: s("the file is gone"),
                },
                "[RESUME FAILED] 7 the file is gone",
            ),
            (ServerLine::UploadKept { have: 9 }, "[UPLOAD KEPT] 9"),
            (
                ServerLine::PasswordPrompt { user: s("alice") },
                "Password for alice:",
            ),
            (
                ServerLine::Registered { user: s("alice") },
                "Registered alice.",
            ),
            (ServerLine::PasswordChanged, "Password changed."),
            (
                ServerLine::MessageQueued { user: s("bob") },
                "User bob is offline; message queued.",
            ),
            (
                ServerLine::History {
                    at: s("2026-11-29T14:00:00Z"),
                    from: s("alice"),
                    text: s("hi: there]"),
                },
                "[HISTORY 2026-11-29T14:00:00Z] alice: hi: there]",
            ),
            (
                ServerLine::FileQueued { user: s("bob") },
                "User bob is offline; file queued.",
            ),
            (
                ServerLine::FileEntry {
                    id: 7,
                    at: s("2026-11-29T14:00:00Z"),
                    sender: s("alice"),
                    target: s("GROUP:devs"),
                    filename: s("it's (1) -> x: y.txt"),
                    size: 12,
                    blake3: s("af13"),
                },
                "[FILES #7] 2026-11-29T14:00:00Z alice -> GROUP:devs: 'it's (1) -> x: y.txt' (12 bytes, blake3 af13)",
            ),
            (ServerLine::FilesEnd { count: 1 }, "[FILES END] 1 files"),
            (
                ServerLine::HistoryEnd { count: 2 },
                "[HISTORY END] 2 messages",
            ),
            (
                ServerLine::QueuedAt {
                    at: s("2026-11-29T14:00:00Z"),
                },
                "[QUEUED 2026-11-29T14:00:00Z]",
            ),
            (ServerLine::InboxSent { upto: 512 }, "[INBOX] 512"),
            (ServerLine::Session { token: s("00ff") }, "[SESSION] 00ff"),
        ]
    }

    #[test]
    fn every_line_has_the_labs_exact_text() {
        for (line, text) in every_line() {
            assert_eq!(line.to_string(), text);
            assert_eq!(line.to_wire(), format!("{text}\n"));
        }
    }

    #[test]
    fn every_line_parses_back() {
        for (line, text) in every_line() {
            assert_eq!(ServerLine::parse(text), line, "{text}");
        }
    }

    #[test]
    fn a_saved_name_that_ends_like_another_line_still_parses_as_its_own() {
        let line = ServerLine::NoFileSocket {
            user: "bob".into(),
            saved_as: "received_from_a_x not found.".into(),
        };
        assert_eq!(ServerLine::parse(&line.to_string()), line);
    }

    #[test]
    fn unknown_lines_are_kept_as_they_came() {
        for text in ["hello", "[PRIVATE from x", "[FILE] odd", "", "User x"] {
            assert_eq!(ServerLine::parse(text), ServerLine::Other(text.to_owned()));
        }
    }
}

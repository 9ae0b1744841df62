//! What a client sends on the chat port, parsed against one table of commands.
//!
//! Every command is one [`Spec`] in [`COMMANDS`]: its name, how many arguments it takes,
//! its usage line and its help text. Parsing, formatting, the usage replies and `help`
//! all read that table, so a new command is one entry here plus its handler in the server.
//!
//! Matches the lab's server where the lab is sound: the line is trimmed of surrounding
//! whitespace, the command is its first space-separated word, case-insensitive, and the
//! last argument (the message) keeps its inner spacing. It differs where the lab is not:
//! the command is the *whole* first word (`msgfoo` is unknown, where the lab took it for
//! `msg`), and a command missing its arguments gets its usage line instead of an exception
//! that dropped the connection. A first word that names no command is not an error here:
//! it is [`Parsed::Unknown`], handed to the server's one place for unknown commands.

/// The lab's acknowledgement prefix: `FILE_RECEIVED|<original sender>|<filename>`.
pub const FILE_RECEIVED_PREFIX: &str = "FILE_RECEIVED|";

/// Our client's report of a file it could not save (an extension, sent only to a server
/// that answered [`HELLO`]): `FILE_FAILED|<original sender>|<filename>|<reason>`.
pub const FILE_FAILED_PREFIX: &str = "FILE_FAILED|";

/// Our client's confirmation of the offline-inbox messages it has received (an extension,
/// sent only in answer to the server's `[INBOX] <id>`): `INBOX_RECEIVED|<id>`.
pub const INBOX_RECEIVED_PREFIX: &str = "INBOX_RECEIVED|";

/// The line our client sends once logged in to ask for the protocol's extensions. The
/// lab's server answers it with its unknown-command line; ours with
/// `[HELLO] relaychat/1` (`ServerLine::Hello`). A client that never sends it sees the
/// lab's protocol byte for byte.
pub const HELLO: &str = "relaychat/1";

/// Most arguments a command takes.
pub const MAX_ARGS: usize = 2;

/// One chat command, as data.
#[derive(Debug, PartialEq, Eq)]
pub struct Spec {
    /// The first word, lower case (matched case-insensitively).
    pub name: &'static str,
    /// Space-separated arguments; the last one is the rest of the line. Each must be
    /// non-empty.
    pub args: usize,
    /// The line a user gets when arguments are missing (the lab's own for `msg` and
    /// `send_group`).
    pub usage: &'static str,
    /// One line on what it does, for `help`.
    pub help: &'static str,
}

/// `msg <username> <message>`: a private message.
pub static MSG: Spec = Spec {
    name: "msg",
    args: 2,
    usage: "Usage: msg <username> <message>",
    help: "send a private message to one user",
};
/// `broadcast <message>`: to every other connected user.
pub static BROADCAST: Spec = Spec {
    name: "broadcast",
    args: 1,
    usage: "Usage: broadcast <message>",
    help: "send a message to everyone connected",
};
/// `list`: the other connected users.
pub static LIST: Spec = Spec {
    name: "list",
    args: 0,
    usage: "Usage: list",
    help: "show who is connected",
};
/// `join <group_name>`: joins a group, creating it on first join.
pub static JOIN: Spec = Spec {
    name: "join",
    args: 1,
    usage: "Usage: join <group_name>",
    help: "join a group (created if it does not exist)",
};
/// `send_group <group_name> <message>`.
pub static SEND_GROUP: Spec = Spec {
    name: "send_group",
    args: 2,
    usage: "Usage: send_group <group_name> <message>",
    help: "send a message to the other members of a group",
};

/// `leave <group_name>`: leaves a group (deleted once empty).
pub static LEAVE: Spec = Spec {
    name: "leave",
    args: 1,
    usage: "Usage: leave <group_name>",
    help: "leave a group",
};
/// `groups`: the groups one is in.
pub static GROUPS: Spec = Spec {
    name: "groups",
    args: 0,
    usage: "Usage: groups",
    help: "show the groups you are in",
};
/// `members <group_name>`: who is in a group one is in.
pub static MEMBERS: Spec = Spec {
    name: "members",
    args: 1,
    usage: "Usage: members <group_name>",
    help: "show who is in a group you are in",
};

/// `register <password>`: a guest claims its name with a password.
pub static REGISTER: Spec = Spec {
    name: "register",
    args: 1,
    usage: "Usage: register <password>",
    help: "register your name, with a password asked at each login",
};
/// `passwd <old> <new>`: changes one's password.
pub static PASSWD: Spec = Spec {
    name: "passwd",
    args: 2,
    usage: "Usage: passwd <old_password> <new_password>",
    help: "change your password",
};
/// `history <user|GROUP:group> [n]`: the last messages of a conversation.
pub static HISTORY: Spec = Spec {
    name: "history",
    args: 1,
    usage: "Usage: history <username|GROUP:group_name> [count]",
    help: "show the last messages with a user or in a group (registered users)",
};

/// `files`: the last files one sent or received, with their ids.
pub static FILES: Spec = Spec {
    name: "files",
    args: 0,
    usage: "Usage: files",
    help: "list the files you sent or received, with ids for get (registered users)",
};
/// `get <id>`: a file of the index again, on one's file connection.
pub static GET: Spec = Spec {
    name: "get",
    args: 1,
    usage: "Usage: get <file_id>",
    help: "receive a file of the index again (registered users)",
};

/// Every chat command, in the order `help` lists them.
pub static COMMANDS: [&Spec; 13] = [
    &MSG,
    &BROADCAST,
    &LIST,
    &JOIN,
    &SEND_GROUP,
    &LEAVE,
    &GROUPS,
    &MEMBERS,
    &HISTORY,
    &FILES,
    &GET,
    &REGISTER,
    &PASSWD,
];

/// Fewest characters in a password.
pub const MIN_PASSWORD_CHARS: usize = 8;
/// Most bytes in a password.
pub const MAX_PASSWORD_BYTES: usize = 128;

/// Why a password was refused. The text is what the user is told after `ERROR: `.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PasswordError {
    /// Fewer than [`MIN_PASSWORD_CHARS`] characters.
    #[error("password is shorter than {MIN_PASSWORD_CHARS} characters")]
    TooShort,
    /// More than [`MAX_PASSWORD_BYTES`] bytes.
    #[error("password is longer than {MAX_PASSWORD_BYTES} bytes")]
    TooLong,
    /// A space or a control character: a password is one word of the command line
    /// (`passwd <old> <new>`).
    #[error("password may not contain spaces or control characters")]
    BadChar,
    /// The word our client asks for the extensions with (it could not be told apart).
    #[error("password may not be '{HELLO}'")]
    Reserved,
}

/// Checks a new password: one word of 8 characters to 128 bytes.
pub fn check_password(password: &str) -> Result<(), PasswordError> {
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(PasswordError::TooLong);
    }
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(PasswordError::TooShort);
    }
    if password
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(PasswordError::BadChar);
    }
    if password == HELLO {
        return Err(PasswordError::Reserved);
    }
    Ok(())
}

/// Messages `history` shows when no count is given, and at most.
pub const HISTORY_DEFAULT: usize = 20;
/// The most messages one `history` shows.
pub const HISTORY_MAX: usize = 1000;

/// A `history` request: whose conversation, and how many messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryRequest<'a> {
    /// A user name, or a group name (given as `GROUP:<name>`).
    pub with: &'a str,
    /// Whether `with` names a group.
    pub group: bool,
    /// How many messages (1 to [`HISTORY_MAX`]).
    pub count: usize,
}

/// Parses the argument of `history` (`bob`, `bob 50`, `GROUP:devs 5`); `None` if the count
/// is not a whole number of at least 1 or there is more after it. Counts past
/// [`HISTORY_MAX`] are cut to it.
pub fn parse_history(arg: &str) -> Option<HistoryRequest<'_>> {
    let mut words = arg.split_whitespace();
    let target = words.next()?;
    let count = match words.next() {
        Some(n) => n.parse::<usize>().ok().filter(|&n| n > 0)?,
        None => HISTORY_DEFAULT,
    };
    if words.next().is_some() {
        return None;
    }
    let (with, group) = match target.strip_prefix(crate::protocol::file_header::GROUP_PREFIX) {
        Some(name) => (name, true),
        None => (target, false),
    };
    Some(HistoryRequest {
        with,
        group,
        count: count.min(HISTORY_MAX),
    })
}

/// A command of the table with its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Call<'a> {
    /// Which command.
    pub spec: &'static Spec,
    /// Its arguments; the first `spec.args` are set.
    pub args: [&'a str; MAX_ARGS],
}

impl<'a> Call<'a> {
    /// Argument `i` (empty past `spec.args`).
    pub fn arg(&self, i: usize) -> &'a str {
        self.args.get(i).copied().unwrap_or_default()
    }

    /// Whether this is a call of `spec` (names are unique in the table).
    pub fn is(&self, spec: &Spec) -> bool {
        self.spec.name == spec.name
    }
}

/// A chat line, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// A command of the table.
    Call(Call<'a>),
    /// `FILE_RECEIVED|<sender>|<filename>`: a recipient's acknowledgement of a file.
    Ack {
        /// Who sent the file (who gets the `[ACK]`).
        sender: &'a str,
        /// The file's name as it was forwarded.
        filename: &'a str,
    },
    /// [`HELLO`]: the client speaks the extensions.
    Hello,
    /// `FILE_FAILED|<sender>|<filename>|<reason>`: a recipient could not save a file.
    FileFailed {
        /// Who sent the file (who is told).
        sender: &'a str,
        /// The file's name as it was forwarded.
        filename: &'a str,
        /// Why it could not be saved.
        reason: &'a str,
    },
    /// `INBOX_RECEIVED|<id>`: the client has every queued message up to inbox entry `id`.
    InboxReceived {
        /// The last inbox entry received.
        upto: u64,
    },
    /// A first word that names no command; the server decides what it means.
    Unknown {
        /// The first word, as typed.
        word: &'a str,
        /// Everything after it (trimmed line).
        rest: &'a str,
    },
}

/// Why a line is not a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandError {
    /// Nothing but whitespace: ignored (the lab's client never sends one).
    Empty,
    /// A known command with missing arguments.
    Usage(&'static Spec),
    /// `FILE_RECEIVED|` or `FILE_FAILED|` without its fields.
    MalformedAck,
    /// `INBOX_RECEIVED|` without a number.
    MalformedInboxReceipt,
}

/// The command named `word` (case-insensitive).
pub fn find(word: &str) -> Option<&'static Spec> {
    COMMANDS
        .iter()
        .copied()
        .find(|spec| spec.name.eq_ignore_ascii_case(word))
}

/// Parses one chat line (already framed, without its line ending).
pub fn parse_command(line: &str) -> Result<Parsed<'_>, CommandError> {
    let line = line.trim();
    if line.is_empty() {
        return Err(CommandError::Empty);
    }
    if let Some(rest) = line.strip_prefix(FILE_RECEIVED_PREFIX) {
        return match rest.split_once('|') {
            Some((sender, filename)) if !sender.is_empty() && !filename.is_empty() => {
                Ok(Parsed::Ack { sender, filename })
            }
            _ => Err(CommandError::MalformedAck),
        };
    }
    if let Some(rest) = line.strip_prefix(FILE_FAILED_PREFIX) {
        let mut fields = rest.splitn(3, '|');
        return match (fields.next(), fields.next(), fields.next()) {
            (Some(sender), Some(filename), Some(reason))
                if !sender.is_empty() && !filename.is_empty() =>
            {
                Ok(Parsed::FileFailed {
                    sender,
                    filename,
                    reason,
                })
            }
            _ => Err(CommandError::MalformedAck),
        };
    }
    if let Some(upto) = line.strip_prefix(INBOX_RECEIVED_PREFIX) {
        return match upto.parse() {
            Ok(upto) => Ok(Parsed::InboxReceived { upto }),
            Err(_) => Err(CommandError::MalformedInboxReceipt),
        };
    }
    if line == HELLO {
        return Ok(Parsed::Hello);
    }
    let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
    let Some(spec) = find(word) else {
        return Ok(Parsed::Unknown { word, rest });
    };
    let mut parts = line.splitn(spec.args + 1, ' ').skip(1);
    let mut args = [""; MAX_ARGS];
    for slot in args.iter_mut().take(spec.args) {
        match parts.next() {
            Some(arg) if !arg.is_empty() => *slot = arg,
            _ => return Err(CommandError::Usage(spec)),
        }
    }
    Ok(Parsed::Call(Call { spec, args }))
}

/// Formats a command as our client sends it: one line, newline-terminated (the lab's
/// server strips the newline; ours frames on it, with no idle pause to wait for).
pub fn format_command(spec: &Spec, args: &[&str]) -> String {
    let mut line = String::from(spec.name);
    for arg in args.iter().take(spec.args) {
        line.push(' ');
        line.push_str(arg);
    }
    line.push('\n');
    line
}

/// Formats an acknowledgement: `FILE_RECEIVED|<sender>|<filename>\n`.
pub fn format_ack(sender: &str, filename: &str) -> String {
    format!("{FILE_RECEIVED_PREFIX}{sender}|{filename}\n")
}

/// Formats an inbox confirmation: `INBOX_RECEIVED|<id>\n`.
pub fn format_inbox_received(upto: u64) -> String {
    format!("{INBOX_RECEIVED_PREFIX}{upto}\n")
}

/// Formats a failed receipt: `FILE_FAILED|<sender>|<filename>|<reason>\n` (line breaks in
/// the reason become spaces).
pub fn format_file_failed(sender: &str, filename: &str, reason: &str) -> String {
    let reason = reason.replace(['\n', '\r'], " ");
    format!("{FILE_FAILED_PREFIX}{sender}|{filename}|{reason}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(spec: &'static Spec, a: &'static str, b: &'static str) -> Parsed<'static> {
        Parsed::Call(Call { spec, args: [a, b] })
    }

    #[test]
    fn parses_every_command() {
        assert_eq!(
            parse_command("msg bob hi there"),
            Ok(call(&MSG, "bob", "hi there"))
        );
        assert_eq!(
            parse_command("broadcast  spaced  out "),
            Ok(call(&BROADCAST, " spaced  out", ""))
        );
        assert_eq!(parse_command("list"), Ok(call(&LIST, "", "")));
        assert_eq!(parse_command("list extra words"), Ok(call(&LIST, "", "")));
        assert_eq!(parse_command("join devs"), Ok(call(&JOIN, "devs", "")));
        assert_eq!(
            parse_command("send_group devs Standup at 10 AM."),
            Ok(call(&SEND_GROUP, "devs", "Standup at 10 AM."))
        );
        assert_eq!(
            parse_command("FILE_RECEIVED|alice|report.pdf"),
            Ok(Parsed::Ack {
                sender: "alice",
                filename: "report.pdf"
            })
        );
    }

    #[test]
    fn a_password_is_one_word_of_8_characters_to_128_bytes() {
        assert_eq!(check_password("s3cret-pw"), Ok(()));
        assert_eq!(check_password("éééééééé"), Ok(()), "characters, not bytes");
        assert_eq!(check_password("short"), Err(PasswordError::TooShort));
        assert_eq!(
            check_password(&"x".repeat(129)),
            Err(PasswordError::TooLong)
        );
        assert_eq!(check_password("two words"), Err(PasswordError::BadChar));
        assert_eq!(check_password("tab\there!"), Err(PasswordError::BadChar));
        assert_eq!(check_password(HELLO), Err(PasswordError::Reserved));
    }

    #[test]
    fn history_takes_a_conversation_and_an_optional_count() {
        let req = |with, group, count| Some(HistoryRequest { with, group, count });
        assert_eq!(parse_history("bob"), req("bob", false, HISTORY_DEFAULT));
        assert_eq!(parse_history("GROUP:devs 5"), req("devs", true, 5));
        assert_eq!(parse_history("bob 999999"), req("bob", false, HISTORY_MAX));
        for bad in ["bob 0", "bob -1", "bob x", "bob 5 more", ""] {
            assert_eq!(parse_history(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn commands_are_case_insensitive_and_trimmed() {
        assert_eq!(parse_command("  LIST\r\n"), Ok(call(&LIST, "", "")));
        assert_eq!(parse_command("Msg bob x"), Ok(call(&MSG, "bob", "x")));
    }

    #[test]
    fn an_unknown_word_reaches_the_caller_with_its_arguments() {
        assert_eq!(
            parse_command("msgfoo bob hi"),
            Ok(Parsed::Unknown {
                word: "msgfoo",
                rest: "bob hi"
            })
        );
        assert_eq!(
            parse_command("listing"),
            Ok(Parsed::Unknown {
                word: "listing",
                rest: ""
            })
        );
    }

    #[test]
    fn missing_arguments_give_usage() {
        for (line, spec) in [
            ("msg", &MSG),
            ("msg bob", &MSG),
            ("msg bob ", &MSG),
            ("msg  hi", &MSG),
            ("broadcast", &BROADCAST),
            ("join", &JOIN),
            ("send_group g", &SEND_GROUP),
        ] {
            assert_eq!(
                parse_command(line),
                Err(CommandError::Usage(spec)),
                "{line}"
            );
        }
        assert_eq!(SEND_GROUP.usage, "Usage: send_group <group_name> <message>");
        assert_eq!(MSG.usage, "Usage: msg <username> <message>");
    }

    #[test]
    fn blank_lines_and_bad_acks() {
        assert_eq!(parse_command(" \t "), Err(CommandError::Empty));
        assert_eq!(
            parse_command("FILE_RECEIVED|alice"),
            Err(CommandError::MalformedAck)
        );
        assert_eq!(
            parse_command("FILE_RECEIVED||x"),
            Err(CommandError::MalformedAck)
        );
    }

    #[test]
    fn formatted_commands_parse_back() {
        for spec in COMMANDS {
            let args = ["bob", "hi  there"];
            let line = format_command(spec, &args);
            assert!(line.ends_with('\n'));
            let Ok(Parsed::Call(call)) = parse_command(line.trim_end_matches('\n')) else {
                panic!("{line:?} does not parse back");
            };
            assert!(call.is(spec));
            assert_eq!(&call.args[..spec.args], &args[..spec.args]);
        }
        assert_eq!(
            parse_command(format_ack("a", "f.txt").trim_end()),
            Ok(Parsed::Ack {
                sender: "a",
                filename: "f.txt"
            })
        );
    }

    #[test]
    fn the_extension_lines_parse() {
        assert_eq!(parse_command("relaychat/1"), Ok(Parsed::Hello));
        assert_eq!(
            parse_command(format_file_failed("a", "f.txt", "disk\nfull").trim_end()),
            Ok(Parsed::FileFailed {
                sender: "a",
                filename: "f.txt",
                reason: "disk full"
            })
        );
        assert_eq!(
            parse_command("FILE_FAILED|a|f"),
            Err(CommandError::MalformedAck)
        );
        assert_eq!(
            parse_command(format_inbox_received(42).trim_end()),
            Ok(Parsed::InboxReceived { upto: 42 })
        );
        for bad in ["INBOX_RECEIVED|", "INBOX_RECEIVED|-1", "INBOX_RECEIVED|x1"] {
            let malformed = Err(CommandError::MalformedInboxReceipt);
            assert_eq!(parse_command(bad), malformed, "{bad}");
        }
    }

    #[test]
    fn names_are_unique_lower_case_words() {
        for (i, spec) in COMMANDS.iter().enumerate() {
            assert_eq!(spec.name, spec.name.to_ascii_lowercase());
            assert!(!spec.name.contains(' '));
            assert!(spec.usage.starts_with("Usage: "));
            assert!(COMMANDS[i + 1..].iter().all(|s| s.name != spec.name));
        }
    }
}

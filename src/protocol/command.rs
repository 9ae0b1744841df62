//! What a client sends on the chat port, parsed.
//!
//! Matches the lab's server where the lab is sound: the line is trimmed of surrounding
//! whitespace, the command is its first space-separated word, case-insensitive, and the
//! last argument (the message) keeps its inner spacing. It differs where the lab is not:
//! the command is the *whole* first word (`msgfoo` is unknown, where the lab took it for
//! `msg`), and a command missing its arguments gets its usage line instead of an exception
//! that dropped the connection.

/// The lab's acknowledgement prefix: `FILE_RECEIVED|<original sender>|<filename>`.
pub const FILE_RECEIVED_PREFIX: &str = "FILE_RECEIVED|";

/// A well-formed chat command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<'a> {
    /// `msg <username> <message>`: a private message.
    Msg {
        /// Recipient.
        to: &'a str,
        /// The message, as typed.
        text: &'a str,
    },
    /// `broadcast <message>`: to every other connected user.
    Broadcast {
        /// The message.
        text: &'a str,
    },
    /// `list`: the other connected users.
    List,
    /// `join <group_name>`.
    Join {
        /// The group, created on first join.
        group: &'a str,
    },
    /// `send_group <group_name> <message>`.
    SendGroup {
        /// The group.
        group: &'a str,
        /// The message.
        text: &'a str,
    },
    /// `FILE_RECEIVED|<sender>|<filename>`: a recipient's acknowledgement of a file.
    FileReceived {
        /// Who sent the file (who gets the `[ACK]`).
        sender: &'a str,
        /// The file's name as it was forwarded.
        filename: &'a str,
    },
}

/// A command with missing arguments; each knows its usage line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// `msg` without recipient or message.
    Msg,
    /// `broadcast` without message.
    Broadcast,
    /// `join` without group.
    Join,
    /// `send_group` without group or message.
    SendGroup,
}

impl Usage {
    /// The line the user is sent (the `msg` and `send_group` lines are the lab's).
    pub fn line(self) -> &'static str {
        match self {
            Usage::Msg => "Usage: msg <username> <message>",
            Usage::Broadcast => "Usage: broadcast <message>",
            Usage::Join => "Usage: join <group_name>",
            Usage::SendGroup => "Usage: send_group <group_name> <message>",
        }
    }
}

/// Why a line is not a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandError {
    /// Nothing but whitespace: ignored (the lab's client never sends one).
    Empty,
    /// A known command with missing arguments.
    Usage(Usage),
    /// A first word that is no command.
    Unknown,
    /// `FILE_RECEIVED|` without both fields.
    MalformedAck,
}

/// How each command splits: its name, how many space-separated arguments it takes (the
/// last one is the rest of the line), and its usage line when some are missing.
struct Spec {
    name: &'static str,
    args: usize,
    usage: Option<Usage>,
}

const COMMANDS: [Spec; 5] = [
    Spec {
        name: "msg",
        args: 2,
        usage: Some(Usage::Msg),
    },
    Spec {
        name: "broadcast",
        args: 1,
        usage: Some(Usage::Broadcast),
    },
    Spec {
        name: "list",
        args: 0,
        usage: None,
    },
    Spec {
        name: "join",
        args: 1,
        usage: Some(Usage::Join),
    },
    Spec {
        name: "send_group",
        args: 2,
        usage: Some(Usage::SendGroup),
    },
];

/// Parses one chat line (already framed, without its line ending).
pub fn parse_command(line: &str) -> Result<Command<'_>, CommandError> {
    let line = line.trim();
    if line.is_empty() {
        return Err(CommandError::Empty);
    }
    if let Some(rest) = line.strip_prefix(FILE_RECEIVED_PREFIX) {
        return match rest.split_once('|') {
            Some((sender, filename)) if !sender.is_empty() && !filename.is_empty() => {
                Ok(Command::FileReceived { sender, filename })
            }
            _ => Err(CommandError::MalformedAck),
        };
    }
    let word = line.split(' ').next().unwrap_or_default();
    let spec = COMMANDS
        .iter()
        .find(|spec| spec.name.eq_ignore_ascii_case(word))
        .ok_or(CommandError::Unknown)?;
    let mut parts = line.splitn(spec.args + 1, ' ').skip(1);
    let mut args = [""; 2];
    for slot in args.iter_mut().take(spec.args) {
        match parts.next() {
            Some(arg) if !arg.is_empty() => *slot = arg,
            _ => return Err(CommandError::Usage(spec.usage.unwrap_or(Usage::Msg))),
        }
    }
    Ok(match spec.name {
        "msg" => Command::Msg {
            to: args[0],
            text: args[1],
        },
        "broadcast" => Command::Broadcast { text: args[0] },
        "list" => Command::List,
        "join" => Command::Join { group: args[0] },
        _ => Command::SendGroup {
            group: args[0],
            text: args[1],
        },
    })
}

/// Formats a command as our client sends it: one line, newline-terminated. (The lab's
/// server strips the newline; ours frames on it, with no idle pause to wait for.)
pub fn format_command(cmd: &Command<'_>) -> String {
    match cmd {
        Command::Msg { to, text } => format!("msg {to} {text}\n"),
        Command::Broadcast { text } => format!("broadcast {text}\n"),
        Command::List => "list\n".to_owned(),
        Command::Join { group } => format!("join {group}\n"),
        Command::SendGroup { group, text } => format!("send_group {group} {text}\n"),
        Command::FileReceived { sender, filename } => {
            format!("{FILE_RECEIVED_PREFIX}{sender}|{filename}\n")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_command() {
        assert_eq!(
            parse_command("msg bob hi there"),
            Ok(Command::Msg {
                to: "bob",
                text: "hi there"
            })
        );
        assert_eq!(
            parse_command("broadcast  spaced  out "),
            Ok(Command::Broadcast {
                text: " spaced  out"
            })
        );
        assert_eq!(parse_command("list"), Ok(Command::List));
        assert_eq!(parse_command("list extra words"), Ok(Command::List));
        assert_eq!(
            parse_command("join devs"),
            Ok(Command::Join { group: "devs" })
        );
        assert_eq!(
            parse_command("send_group devs Standup at 10 AM."),
            Ok(Command::SendGroup {
                group: "devs",
                text: "Standup at 10 AM."
            })
        );
        assert_eq!(
            parse_command("FILE_RECEIVED|alice|report.pdf"),
            Ok(Command::FileReceived {
                sender: "alice",
                filename: "report.pdf"
            })
        );
    }

    #[test]
    fn commands_are_case_insensitive_and_trimmed() {
        assert_eq!(parse_command("  LIST\r\n"), Ok(Command::List));
        assert_eq!(
            parse_command("Msg bob x"),
            Ok(Command::Msg {
                to: "bob",
                text: "x"
            })
        );
    }

    #[test]
    fn the_command_is_the_whole_first_word() {
        assert_eq!(parse_command("msgfoo bob hi"), Err(CommandError::Unknown));
        assert_eq!(parse_command("listing"), Err(CommandError::Unknown));
        assert_eq!(parse_command("hello"), Err(CommandError::Unknown));
    }

    #[test]
    fn missing_arguments_give_usage() {
        assert_eq!(parse_command("msg"), Err(CommandError::Usage(Usage::Msg)));
        assert_eq!(
            parse_command("msg bob"),
            Err(CommandError::Usage(Usage::Msg))
        );
        assert_eq!(
            parse_command("msg bob "),
            Err(CommandError::Usage(Usage::Msg))
        );
        assert_eq!(
            parse_command("msg  hi"),
            Err(CommandError::Usage(Usage::Msg))
        );
        assert_eq!(
            parse_command("broadcast"),
            Err(CommandError::Usage(Usage::Broadcast))
        );
        assert_eq!(parse_command("join"), Err(CommandError::Usage(Usage::Join)));
        assert_eq!(
            parse_command("send_group g"),
            Err(CommandError::Usage(Usage::SendGroup))
        );
        assert_eq!(
            Usage::SendGroup.line(),
            "Usage: send_group <group_name> <message>"
        );
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
        let cmds = [
            Command::Msg {
                to: "bob",
                text: "hi  there",
            },
            Command::Broadcast { text: "all" },
            Command::List,
            Command::Join { group: "g" },
            Command::SendGroup {
                group: "g",
                text: "t",
            },
            Command::FileReceived {
                sender: "a",
                filename: "f.txt",
            },
        ];
        for cmd in cmds {
            let line = format_command(&cmd);
            assert!(line.ends_with('\n'));
            assert_eq!(parse_command(line.trim_end_matches('\n')), Ok(cmd));
        }
    }
}

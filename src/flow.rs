//! How a step of a connection task ends when it does not simply succeed: one type for the
//! server's tasks and the client engine's alike.
//!
//! A step either is refused ([`Stop::Refused`]: the request failed, the user is told why in
//! one line, and the connection goes on) or ends the connection ([`Stop::Ended`]: nothing
//! more can be said on it; the reason is for the log). Every user-facing reason is a
//! variant of [`Refusal`], whose text is exactly what follows `ERROR: ` on the wire.

use std::time::Duration;

use crate::protocol::{FrameError, HeaderError, NameError};

/// Why a connection is over.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Ended {
    /// The peer closed its side, or the connection was closed (shutdown, a kill switch).
    #[error("left")]
    Closed,
    /// The peer broke the framing rules.
    #[error("{0}")]
    Frame(#[from] FrameError),
    /// The socket failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The peer sent (or took) nothing for this long.
    #[error("nothing for {0:?}")]
    Stalled(Duration),
    /// A transfer broke off after `got` of `size` bytes.
    #[error("broke off after {got} of {size} bytes")]
    BrokeOff {
        /// Bytes that arrived.
        got: u64,
        /// Bytes announced.
        size: u64,
    },
}

/// Why a request was refused: the text is the user's `ERROR: <reason>` line.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refusal {
    /// The server holds as many connections as it may.
    #[error("the server is full; try again later")]
    ServerFull,
    /// The address holds as many connections as it may.
    #[error("too many connections from your address")]
    TooManyFromAddress,
    /// The line before the username broke the framing rules (too long).
    #[error("{0}")]
    Frame(FrameError),
    /// No username arrived in time.
    #[error("no username within {} s", .0.as_secs_f64())]
    NoUsername(Duration),
    /// A username, group or file name that breaks the rules.
    #[error("{0}")]
    Name(#[from] NameError),
    /// The username's bytes are not UTF-8.
    #[error("username is not valid UTF-8")]
    UsernameNotUtf8,
    /// Someone is connected under that name.
    #[error("username '{0}' is already connected")]
    NameTaken(String),
    /// A name that looks like a connected user's (same confusable skeleton).
    #[error("username '{name}' looks too much like '{other}', who is connected")]
    LookAlike {
        /// The name asked for.
        name: String,
        /// The connected user it could be taken for.
        other: String,
    },
    /// A name that looks like a registered one (same confusable skeleton).
    #[error("username '{name}' looks too much like '{other}', which is registered")]
    LookAlikeRegistered {
        /// The name asked for.
        name: String,
        /// The registered name it could be taken for.
        other: String,
    },
    /// A file connection for a name with no chat session.
    #[error("'{0}' has no chat session; log in on the chat port first")]
    NoChatSession(String),
    /// A file connection from another address than the name's chat session.
    #[error("'{0}' is connected from another address")]
    OtherAddress(String),
    /// A file connection whose secret is not its chat session's.
    #[error("the file connection's proof does not match a chat session of '{0}'")]
    BadProof(String),
    /// A name-only file connection for a session whose client was given a proof.
    #[error("'{0}' must open its file connection with its session's proof")]
    ProofRequired(String),
    /// A request that needs the user's file connection, which it does not have.
    #[error("you have no file connection")]
    NoFileConnection,
    /// `get` of a file that is not in the index, or not the user's.
    #[error("no file #{0} of yours is in the index")]
    NoSuchFile(u64),
    /// The name has a live file connection already.
    #[error("'{0}' already has a file connection")]
    FileConnectionTaken(String),
    /// The server is shutting down.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The password given at login (or as the old one of `passwd`) is not the account's.
    #[error("wrong password")]
    WrongPassword,
    /// Too many wrong passwords for this name or from this address, lately.
    #[error("too many attempts, try again in {0} s")]
    TooManyAttempts(u64),
    /// A password over plain text from another machine, which the operator has not
    /// allowed (`--allow-plaintext-login`).
    #[error("log in over TLS")]
    PasswordNeedsTls,
    /// A plain-text connection to a server that requires TLS.
    #[error("this server requires TLS")]
    TlsRequired,
    /// A guest, on a server that admits registered users only.
    #[error("this server requires an account")]
    AccountRequired,
    /// No password arrived in time after the prompt.
    #[error("no password within {} s", .0.as_secs_f64())]
    NoPassword(Duration),
    /// `register` on a server whose operator closed registration.
    #[error("registration is closed on this server")]
    RegistrationClosed,
    /// `register` by a user whose name is registered already.
    #[error("'{0}' is registered already")]
    AlreadyRegistered(String),
    /// A command only registered users have.
    #[error("{0} needs an account (register first)")]
    NeedsAccount(&'static str),
    /// A new password that breaks the rules.
    #[error("{0}")]
    Password(#[from] crate::protocol::command::PasswordError),
    /// A user's offline inbox holds as many messages as it may.
    #[error("{0}'s inbox is full")]
    InboxFull(String),
    /// The server keeps no history.
    #[error("history is off on this server")]
    HistoryOff,
    /// A `history` argument that does not parse.
    #[error("usage: history <username|GROUP:group_name> [count], count from 1")]
    BadHistory,
    /// The store failed a write or read a request needs.
    #[error("the server could not store that just now; try again later")]
    StoreFailed,
    /// A server hook (a plugin) refused it, for this reason.
    #[error("{0}")]
    Hook(String),
    /// A checked upload whose bytes do not have the hash its uploader sent.
    #[error(
        "'{filename}' arrived corrupted (BLAKE3 {got}, the sender's is {sent}); it was not saved"
    )]
    Corrupted {
        /// The file's name as sent.
        filename: String,
        /// The hash the uploader sent.
        sent: String,
        /// The hash of what arrived.
        got: String,
    },
    /// A checked upload that its uploader gave up on after its body (`failed <why>`).
    #[error("'{filename}' was not saved: the sender gave up on it ({why})")]
    SenderGaveUp {
        /// The file's name as sent.
        filename: String,
        /// The uploader's reason.
        why: String,
    },
    /// A checked upload's trailer did not come (the connection is out of step).
    #[error("{0}")]
    Trailer(Ended),
    /// A command line that is not UTF-8.
    #[error("command is not valid UTF-8")]
    CommandNotUtf8,
    /// A user in as many groups as allowed.
    #[error("you are in too many groups (at most {0})")]
    TooManyGroups(usize),
    /// `FILE_RECEIVED|` without both fields.
    #[error("malformed acknowledgement: expected FILE_RECEIVED|<sender>|<filename>")]
    MalformedAck,
    /// `INBOX_RECEIVED|` without a number.
    #[error("malformed inbox receipt: expected INBOX_RECEIVED|<id>")]
    MalformedInboxReceipt,
    /// An inbox receipt past what was sent to the user.
    #[error("no queued messages up to {0} were sent to you")]
    InboxNotSent(u64),
    /// An acknowledgement for a file that was not forwarded to the user.
    #[error("no file '{filename}' from {sender} is waiting for your acknowledgement")]
    NoSuchAck {
        /// Who was named as the sender.
        sender: String,
        /// The file named.
        filename: String,
    },
    /// An upload header that does not parse (its text says "invalid file header: ...").
    #[error("{0}")]
    Header(#[from] HeaderError),
    /// A file-port line over the limit.
    #[error("invalid file header: {0}")]
    HeaderFrame(FrameError),
    /// Bytes read past and dropped after an invalid upload header.
    #[error("discarded {0} bytes after an invalid header")]
    Discarded(u64),
    /// `received_from_<sender>_<name>.tmp` does not fit in one path component.
    #[error("file name too long to save as {0}")]
    SavedNameTooLong(String),
    /// A file over `max_file_size`.
    #[error("file too large: {size} bytes (limit {limit})")]
    TooLarge {
        /// Announced size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The user's quota would be exceeded.
    #[error("upload quota exceeded: {used} of {quota} bytes used, this file needs {size}")]
    Quota {
        /// Bytes the user has stored.
        used: u64,
        /// The quota.
        quota: u64,
        /// Bytes this file needs.
        size: u64,
    },
    /// The store cannot say how much the user has stored (so the quota cannot be checked).
    #[error("the server cannot check your quota just now ({0}); try again later")]
    Store(String),
    /// The disk would fall under the free space the server keeps.
    #[error("not enough disk space on the server for this file")]
    DiskFull,
    /// A file could not be written or put in place.
    #[error("could not save file '{filename}': {error}")]
    CannotSave {
        /// The file's name as sent.
        filename: String,
        /// What the file system said.
        error: std::io::Error,
    },
    /// A recipient has as many forwards waiting as it may.
    #[error("{recipient} has too many files waiting; file saved as {saved_as}")]
    TooManyWaiting {
        /// The recipient.
        recipient: String,
        /// Name of the server's copy.
        saved_as: String,
    },
    /// A recipient's client received a file but could not save it.
    #[error("'{filename}' could not be saved by {recipient}: {reason}")]
    NotSaved {
        /// The file's name as sent.
        filename: String,
        /// The recipient.
        recipient: String,
        /// What its client said.
        reason: String,
    },
    /// A forward that was queued or under way failed.
    #[error("'{filename}' could not be delivered to {recipient}: {why}")]
    NotDelivered {
        /// The file's name as sent.
        filename: String,
        /// The recipient.
        recipient: String,
        /// What happened.
        why: String,
    },
}

/// How a step that did not succeed stopped.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Stop {
    /// The request failed; the user is told, and the connection goes on.
    #[error("{0}")]
    Refused(#[from] Refusal),
    /// The connection is over.
    #[error("{0}")]
    Ended(#[from] Ended),
}

/// The result of one step of a connection task.
pub(crate) type Step<T = ()> = Result<T, Stop>;

//! Typed events for Python: one frozen class per kind of server line or engine event.
//!
//! Every event has `line`: the text the lab's client would print for it, so a terminal
//! front end prints `event.line` and a bot matches on the class and its fields.

use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::client::{Direction, Event as EngineEvent};
use crate::protocol::ServerLine;

/// The base class of every event: `line` is what the lab's client prints for it.
#[pyclass(module = "relaychat._native", subclass, frozen)]
pub struct Event {
    /// The line as the lab's client prints it.
    #[pyo3(get)]
    line: String,
}

#[pymethods]
impl Event {
    fn __str__(&self) -> &str {
        &self.line
    }
}

macro_rules! events {
    ($( $(#[doc = $doc:literal])* $name:ident { $($field:ident : $ty:ty),* } )*) => {
        $(
            $(#[doc = $doc])*
            #[pyclass(module = "relaychat._native", extends = Event, frozen, get_all)]
            pub struct $name {
                $(pub $field: $ty,)*
            }

            #[pymethods]
            impl $name {
                #[classattr]
                fn __match_args__(py: Python<'_>) -> PyResult<Py<PyTuple>> {
                    let names: &[&str] = &[$(stringify!($field)),*];
                    Ok(PyTuple::new(py, names)?.unbind())
                }

                fn __repr__(&self) -> String {
                    let fields: Vec<String> = vec![$(format!("{}={:?}", stringify!($field), self.$field)),*];
                    format!("{}({})", stringify!($name), fields.join(", "))
                }
            }
        )*

        pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
            m.add_class::<Event>()?;
            $(m.add_class::<$name>()?;)*
            Ok(())
        }
    };
}

events! {
    /// `Welcome, <user>!`: the server accepted the username.
    Welcome { user: String }
    /// `[PRIVATE from <sender>]: <text>`; `queued_at` is when it was sent if it waited in
    /// our inbox while we were away (UTC, ISO 8601), else `None`.
    PrivateMessage { sender: String, text: String, queued_at: Option<String> }
    /// `[BROADCAST from <sender>]: <text>` (`queued_at` as for `PrivateMessage`).
    BroadcastMessage { sender: String, text: String, queued_at: Option<String> }
    /// `[GROUP <group>] <sender>: <text>` (`queued_at` as for `PrivateMessage`).
    GroupMessage { group: String, sender: String, text: String, queued_at: Option<String> }
    /// `You joined group '<group>'` (for a `join` typed as a raw command).
    Joined { group: String }
    /// `You are not in group '<group>'`.
    NotInGroup { group: String }
    /// `You left group '<group>'`.
    Left { group: String }
    /// `Your groups: ...`: the groups one is in.
    GroupList { groups: Vec<String> }
    /// `Members of '<group>': ...`.
    MemberList { group: String, members: Vec<String> }
    /// `Connected users: ...` (for a `list` typed as a raw command).
    UserList { users: Vec<String> }
    /// `User <user> not found.`
    UserNotFound { user: String }
    /// A usage line: the command lacked arguments.
    Usage { text: String }
    /// The unknown-command line.
    UnknownCommand {}
    /// `[FILE] <sender> sent you file '<filename>' (<size> bytes). Incoming on file socket.`
    FileIncoming { sender: String, filename: String, size: u64 }
    /// `[FILE] <sender> sent file '<filename>' to group '<group>'.`
    GroupFileIncoming { sender: String, filename: String, group: String }
    /// `[FILE] You sent file '<filename>' (saved as <saved_as>).`: a file sent to oneself.
    FileSaved { filename: String, saved_as: String }
    /// `User <user> has no file socket; file saved as <saved_as>`.
    NoFileSocket { user: String, saved_as: String }
    /// `[ACK] <recipient> received file '<filename>'`.
    Ack { recipient: String, filename: String }
    /// `Registered <user>.`: the name is ours now (for a `register` typed as a raw command).
    Registered { user: String }
    /// `Password changed.`
    PasswordChanged {}
    /// `User <user> is offline; message queued.`: delivered at their next login.
    MessageQueued { user: String }
    /// `[HISTORY <at>] <sender>: <text>`: one message of a conversation.
    HistoryEntry { at: String, sender: String, text: String }
    /// `[HISTORY END] <count> messages`.
    HistoryEnd { count: usize }
    /// `User <user> is offline; file queued.`: it reaches them at their next login.
    FileQueued { user: String }
    /// `[FILES #<id>] ...`: one file of the index (`get(id)` sends it again).
    FileEntry { id: u64, at: String, sender: String, target: String, filename: String, size: u64, blake3: String }
    /// `[FILES END] <count> files`.
    FilesEnd { count: usize }
    /// `ERROR: <reason>`: the server refused something.
    ServerError { reason: String }
    /// A server line of no known shape, as it came.
    ServerText { text: String }
    /// A file arrived whole, was renamed into place and acknowledged.
    FileReceived { sender: String, filename: String, path: PathBuf, size: u64 }
    /// An incoming file failed; no file was left under its final name.
    FileFailed { reason: String }
    /// How far a transfer has got, for a client made with `progress=True` (`direction` is `"upload"` or `"download"`; `peer` the
    /// upload's target or the file's sender; `rate` in bytes per second since it began):
    /// at most 10 a second per transfer, the last one at `total`.
    TransferProgress { direction: &'static str, peer: String, filename: String, done: u64, total: u64, rate: u64 }
    /// The chat connection closed; nothing follows.
    Disconnected {}
}

/// An engine event on its way to Python.
pub(super) struct PyEvent(pub EngineEvent);

impl PyEvent {
    /// One line of a `files` answer, as its event.
    pub(super) fn file(line: ServerLine) -> Self {
        Self(EngineEvent::Line(line))
    }

    /// One message of a `history` answer, as its event.
    pub(super) fn history(entry: crate::client::HistoryEntry) -> Self {
        Self(EngineEvent::Line(ServerLine::History {
            at: entry.at,
            from: entry.sender,
            text: entry.text,
        }))
    }
}

fn make<'py, T: pyo3::PyClass<BaseType = Event>>(
    py: Python<'py>,
    value: T,
    line: String,
) -> PyResult<Bound<'py, PyAny>> {
    let init = pyo3::PyClassInitializer::from(Event { line }).add_subclass(value);
    Ok(Bound::new(py, init)?.into_any())
}

impl<'py> IntoPyObject<'py> for PyEvent {
    type Target = PyAny;
    type Output = Bound<'py, PyAny>;
    type Error = PyErr;

    fn into_pyobject(self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let line = match &self.0 {
            EngineEvent::Line(l) | EngineEvent::Queued { line: l, .. } => l.to_string(),
            EngineEvent::FileReceived {
                sender, path, size, ..
            } => {
                format!(
                    "[FILE RECEIVED] {} ({size} bytes) from {sender}",
                    path.display()
                )
            }
            EngineEvent::FileFailed { reason } => format!("[FILE RECEIVE ERROR] {reason}"),
            // Made whole below, with its fields.
            EngineEvent::Progress { .. } => String::new(),
            EngineEvent::Disconnected => "Chat connection closed.".to_owned(),
        };
        let (server_line, queued_at) = match self.0 {
            EngineEvent::Line(server_line) => (server_line, None),
            EngineEvent::Queued { at, line } => (line, Some(at)),
            EngineEvent::FileReceived {
                sender,
                filename,
                path,
                size,
            } => {
                let received = FileReceived {
                    sender,
                    filename,
                    path,
                    size,
                };
                return make(py, received, line);
            }
            EngineEvent::FileFailed { reason } => return make(py, FileFailed { reason }, line),
            EngineEvent::Progress {
                direction,
                peer,
                filename,
                done,
                total,
                rate,
            } => {
                let (direction, arrow) = match direction {
                    Direction::Upload => ("upload", "->"),
                    Direction::Download => ("download", "<-"),
                };
                let percent = (done as f64 * 100.0 / total.max(1) as f64).min(100.0);
                let line = format!(
                    "[PROGRESS] {direction} '{filename}' {arrow} {peer}: {done} of {total} \
                     bytes ({percent:.0}%), {:.1} MB/s",
                    rate as f64 / 1e6
                );
                let progress = TransferProgress {
                    direction,
                    peer,
                    filename,
                    done,
                    total,
                    rate,
                };
                return make(py, progress, line);
            }
            EngineEvent::Disconnected => return make(py, Disconnected {}, line),
        };
        match server_line {
            ServerLine::Welcome { user } => make(py, Welcome { user }, line),
            ServerLine::Private { from, text } => make(
                py,
                PrivateMessage {
                    sender: from,
                    text,
                    queued_at,
                },
                line,
            ),
            ServerLine::Broadcast { from, text } => make(
                py,
                BroadcastMessage {
                    sender: from,
                    text,
                    queued_at,
                },
                line,
            ),
            ServerLine::Group { group, from, text } => make(
                py,
                GroupMessage {
                    group,
                    sender: from,
                    text,
                    queued_at,
                },
                line,
            ),
            ServerLine::Joined { group } => make(py, Joined { group }, line),
            ServerLine::NotInGroup { group } => make(py, NotInGroup { group }, line),
            ServerLine::Left { group } => make(py, Left { group }, line),
            ServerLine::Groups { groups } => make(py, GroupList { groups }, line),
            ServerLine::Members { group, members } => make(py, MemberList { group, members }, line),
            ServerLine::Users { users } => make(py, UserList { users }, line),
            ServerLine::UserNotFound { user } => make(py, UserNotFound { user }, line),
            ServerLine::Usage(_) => make(py, Usage { text: line.clone() }, line),
            ServerLine::UnknownCommand => make(py, UnknownCommand {}, line),
            ServerLine::FileIncoming {
                from,
                filename,
                size,
            } => make(
                py,
                FileIncoming {
                    sender: from,
                    filename,
                    size,
                },
                line,
            ),
            ServerLine::FileToGroup {
                from,
                filename,
                group,
            } => make(
                py,
                GroupFileIncoming {
                    sender: from,
                    filename,
                    group,
                },
                line,
            ),
            ServerLine::FileSelf { filename, saved_as } => {
                make(py, FileSaved { filename, saved_as }, line)
            }
            ServerLine::NoFileSocket { user, saved_as } => {
                make(py, NoFileSocket { user, saved_as }, line)
            }
            ServerLine::Ack {
                recipient,
                filename,
            } => make(
                py,
                Ack {
                    recipient,
                    filename,
                },
                line,
            ),
            ServerLine::Error { reason } => make(py, ServerError { reason }, line),
            ServerLine::Registered { user } => make(py, Registered { user }, line),
            ServerLine::PasswordChanged => make(py, PasswordChanged {}, line),
            ServerLine::MessageQueued { user } => make(py, MessageQueued { user }, line),
            ServerLine::History { at, from, text } => make(
                py,
                HistoryEntry {
                    at,
                    sender: from,
                    text,
                },
                line,
            ),
            ServerLine::HistoryEnd { count } => make(py, HistoryEnd { count }, line),
            ServerLine::FileQueued { user } => make(py, FileQueued { user }, line),
            ServerLine::FileEntry {
                id,
                at,
                sender,
                target,
                filename,
                size,
                blake3,
            } => make(
                py,
                FileEntry {
                    id,
                    at,
                    sender,
                    target,
                    filename,
                    size,
                    blake3,
                },
                line,
            ),
            ServerLine::FilesEnd { count } => make(py, FilesEnd { count }, line),
            // The extension's own lines are the engine's business; should one escape
            // the routing, it shows as text.
            ServerLine::Other(text) => make(py, ServerText { text }, line),
            ServerLine::FromServer { text } => make(py, ServerText { text }, line),
            ServerLine::Hello
            | ServerLine::Help { .. }
            | ServerLine::UploadOk { .. }
            | ServerLine::UploadFailed { .. }
            | ServerLine::UploadReady { .. }
            | ServerLine::ResumeFailed { .. }
            | ServerLine::UploadKept { .. }
            | ServerLine::PasswordPrompt { .. }
            | ServerLine::QueuedAt { .. }
            | ServerLine::InboxSent { .. }
            | ServerLine::Session { .. } => make(py, ServerText { text: line.clone() }, line),
        }
    }
}

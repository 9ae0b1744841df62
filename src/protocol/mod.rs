//! The wire protocol, as pure functions: bytes in, values out.
//!
//! Nothing here touches a socket, a runtime or Python, so every parser and formatter can be
//! unit-tested and fuzzed on its own. The server and the client engine both speak through
//! this module, which keeps one formatter and one parser per line of the protocol.
//!
//! * [`framing`] cuts a byte stream into lines (newline-terminated, or closed by an idle
//!   pause for clients that never send a newline, like the lab's own).
//! * [`command`] parses what a client sends on the chat port.
//! * [`server_line`] formats (server) and parses (client) every line the server sends.
//! * [`file_header`] handles the upload and forward headers of the file port.
//! * [`names`] holds the rules for user, group and file names.

pub mod command;
pub mod file_header;
pub mod framing;
pub mod names;
pub mod server_line;

#[cfg(test)]
mod fuzz;

pub use command::{Call, CommandError, Parsed, Spec, COMMANDS};
pub use file_header::{ForwardHeader, HeaderError, Target, UploadHeader};
pub use framing::{FrameError, LineFramer};
pub use names::{normalize, saved_name, skeleton, NameError};
pub use server_line::ServerLine;

/// The greeting the file port sends after a file connection's username, in a write of its
/// own (the lab's client reads it with one `recv` and throws it away).
pub const FILE_SOCKET_CONNECTED: &[u8] = b"FILE_SOCKET_CONNECTED\n";

/// Longest chat line (a command, or the username) the server buffers, in bytes.
pub const DEFAULT_MAX_LINE: usize = 64 * 1024;

/// Longest file-port line (the username or an upload header) the server buffers, in bytes.
pub const DEFAULT_MAX_HEADER: usize = 4 * 1024;

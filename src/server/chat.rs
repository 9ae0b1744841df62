//! The chat port: the username handshake, then one command per line.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::registry::{Outbox, TooManyGroups, MAX_GROUPS_PER_USER};
use super::{read_username, Shared};
use crate::net::{write_loop, LineReader, ReadEnd, SendQueue};
use crate::protocol::command::parse_command;
use crate::protocol::names::check_group;
use crate::protocol::{Command, CommandError, ServerLine};

/// How long a closing connection's writer may take to flush what is queued.
const FLUSH_GRACE: Duration = Duration::from_secs(2);

pub(super) async fn serve(shared: Arc<Shared>, stream: TcpStream, addr: SocketAddr) {
    let (rd, wr) = stream.into_split();
    let kill = shared.shutdown.child_token();
    let queue = SendQueue::new(shared.config.send_queue, shared.config.send_queue_bytes);
    let writer = tokio::spawn(write_loop(
        wr,
        queue.clone(),
        kill.clone(),
        shared.config.send_timeout,
    ));
    let mut reader = LineReader::new(rd, shared.config.max_line, shared.config.idle_pause);
    let id = shared.next_id();

    let claimed = match read_username(&shared, &mut reader, &kill).await {
        Ok(name) => claim(&shared, &name, id, addr, &queue, &kill),
        Err(refusal) => Err(refusal),
    };
    match claimed {
        Ok(outbox) => {
            let user = outbox.user().to_owned();
            info!("[NEW CONNECTION] {user} connected from {addr}");
            let end = session(&shared, &user, &outbox, &mut reader, &kill).await;
            if let ReadEnd::Frame(e) = &end {
                outbox.line(&ServerLine::Error {
                    reason: e.to_string(),
                });
            }
            shared.registry.remove_chat(&user, id);
            info!(
                "[DISCONNECTED] {user} ({})",
                end_reason(&end).unwrap_or_else(|| "left".into())
            );
        }
        Err(Some(reason)) => {
            warn!("[REFUSED] {addr}: {reason}");
            queue.push(Bytes::from(ServerLine::Error { reason }.to_wire()));
        }
        Err(None) => {}
    }
    queue.close();
    let abort = writer.abort_handle();
    if tokio::time::timeout(FLUSH_GRACE, writer).await.is_err() {
        abort.abort();
    }
}

/// Why a read ended, as a reason to log (`None`: an ordinary close).
fn end_reason(end: &ReadEnd) -> Option<String> {
    match end {
        ReadEnd::Closed => None,
        ReadEnd::Frame(e) => Some(e.to_string()),
        ReadEnd::Io(e) => Some(e.to_string()),
    }
}

/// Claims a checked username; the error is the reason for the refusal.
fn claim(
    shared: &Shared,
    name: &str,
    id: u64,
    addr: SocketAddr,
    queue: &Arc<SendQueue>,
    kill: &CancellationToken,
) -> Result<Outbox, Option<String>> {
    let outbox = Outbox::new(name, queue.clone(), kill.clone());
    let welcome = Bytes::from(ServerLine::Welcome { user: name.into() }.to_wire());
    shared
        .registry
        .add_chat(name, id, addr.ip(), outbox.clone(), welcome)
        .map_err(|_| Some(format!("username '{name}' is already connected")))?;
    Ok(outbox)
}

/// Reads and answers commands until the connection ends; returns how it ended.
async fn session(
    shared: &Shared,
    user: &str,
    outbox: &Outbox,
    reader: &mut LineReader,
    kill: &CancellationToken,
) -> ReadEnd {
    loop {
        // A client can send thousands of commands in one read; let the writers that fan
        // them out run in between, so a flood is spread over time, not over queues.
        tokio::task::coop::consume_budget().await;
        let line = match reader.next_line(kill).await {
            Ok(line) => line,
            Err(end) => return end,
        };
        match std::str::from_utf8(&line) {
            Ok(text) => handle(shared, user, outbox, text),
            Err(_) => {
                outbox.line(&ServerLine::Error {
                    reason: "command is not valid UTF-8".into(),
                });
            }
        }
    }
}

/// Answers one command line.
fn handle(shared: &Shared, user: &str, outbox: &Outbox, text: &str) {
    let registry = &shared.registry;
    let reply = |line: ServerLine| {
        outbox.line(&line);
    };
    let command = match parse_command(text) {
        Ok(command) => command,
        Err(CommandError::Empty) => return,
        Err(CommandError::Usage(usage)) => return reply(ServerLine::Usage(usage)),
        Err(CommandError::Unknown) => return reply(ServerLine::UnknownCommand),
        Err(CommandError::MalformedAck) => {
            return reply(ServerLine::Error {
                reason: "malformed acknowledgement: expected FILE_RECEIVED|<sender>|<filename>"
                    .into(),
            })
        }
    };
    debug!("[{user}] {text}");
    match command {
        Command::Msg { to, text } => {
            let line = ServerLine::Private {
                from: user.into(),
                text: text.into(),
            };
            if !registry.send_to(to, Bytes::from(line.to_wire())) {
                reply(ServerLine::UserNotFound { user: to.into() });
            }
        }
        Command::Broadcast { text } => {
            let line = ServerLine::Broadcast {
                from: user.into(),
                text: text.into(),
            };
            registry.broadcast(user, &Bytes::from(line.to_wire()));
        }
        Command::List => reply(ServerLine::Users {
            users: registry.users_except(user),
        }),
        Command::Join { group } => match check_group(group) {
            Ok(()) => match registry.join(group, user) {
                Ok(()) => reply(ServerLine::Joined {
                    group: group.into(),
                }),
                Err(TooManyGroups) => reply(ServerLine::Error {
                    reason: format!("you are in too many groups (at most {MAX_GROUPS_PER_USER})"),
                }),
            },
            Err(e) => reply(ServerLine::Error {
                reason: e.to_string(),
            }),
        },
        Command::SendGroup { group, text } => {
            let line = ServerLine::Group {
                group: group.into(),
                from: user.into(),
                text: text.into(),
            };
            if !registry.send_group(user, group, &Bytes::from(line.to_wire())) {
                reply(ServerLine::NotInGroup {
                    group: group.into(),
                });
            }
        }
        Command::FileReceived { sender, filename } => {
            if !registry.take_ack(user, sender, filename) {
                let reason = format!(
                    "no file '{filename}' from {sender} is waiting for your acknowledgement"
                );
                return reply(ServerLine::Error { reason });
            }
            let ack = ServerLine::Ack {
                recipient: user.into(),
                filename: filename.into(),
            };
            registry.send_to(sender, Bytes::from(ack.to_wire()));
        }
    }
}

//! The chat port: the username handshake, then one command per line, each answered by its
//! handler in [`HANDLERS`] (the protocol's command table paired with the code that runs
//! it). A first word that names no command goes to [`unknown`], the one place a later
//! extension hooks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::registry::{Held, Outbox};
use super::{read_username, Shared};
use crate::flow::{Ended, Refusal, Stop};
use crate::net::{write_loop, Conn, LineReader, SendQueue};
use crate::protocol::command::{
    parse_command, Call, Parsed, Spec, BROADCAST, GROUPS, JOIN, LEAVE, LIST, MEMBERS, MSG,
    SEND_GROUP,
};
use crate::protocol::names::{check_group, normalize};
use crate::protocol::{CommandError, ServerLine};

/// How long a closing connection's writer may take to flush what is queued.
const FLUSH_GRACE: Duration = Duration::from_secs(2);
/// How long a session waits on a congested recipient that takes nothing at all before it
/// goes on without waiting for it (that recipient's queue then fills to its hard cap, and
/// `send_timeout` drops it if it still takes nothing).
const FLOW_GRACE: Duration = Duration::from_secs(1);

/// One user's chat session, as its command handlers see it.
struct Session<'a> {
    shared: &'a Shared,
    /// The user's name.
    user: &'a str,
    /// The user's own outgoing queue (for replies).
    outbox: &'a Outbox,
    /// What the current command's deliveries left to wait for (flow control).
    held: std::sync::Mutex<Held>,
}

impl Session<'_> {
    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn reply(&self, line: ServerLine) {
        self.outbox
            .deliver(Bytes::from(line.to_wire()), &mut self.held());
    }

    fn refuse(&self, refusal: Refusal) {
        self.reply(ServerLine::Error {
            reason: refusal.to_string(),
        });
    }
}

/// A command's handler.
type Handler = fn(&Session<'_>, &Call<'_>);

/// Every command of the protocol's table with the code that runs it.
static HANDLERS: [(&Spec, Handler); 8] = [
    (&MSG, msg),
    (&BROADCAST, broadcast),
    (&LIST, list),
    (&JOIN, join),
    (&SEND_GROUP, send_group),
    (&LEAVE, leave),
    (&GROUPS, groups),
    (&MEMBERS, members),
];

pub(super) async fn serve(shared: Arc<Shared>, conn: Conn, addr: SocketAddr) {
    let (rd, wr) = conn.split();
    let kill = shared.shutdown.child_token();
    let limits = &shared.config.limits;
    let queue = SendQueue::new(
        limits.send_queue,
        limits.send_queue_bytes,
        limits.send_queue_high_water,
    );
    let writer = tokio::spawn(write_loop(
        wr,
        queue.clone(),
        kill.clone(),
        limits.send_timeout,
    ));
    let mut reader = LineReader::new(rd, limits.max_line, limits.idle_pause);
    let id = shared.next_id();

    let claimed = match read_username(&shared, &mut reader, &kill).await {
        Ok(name) => claim(&shared, &name, id, addr, &queue, &kill).map_err(Stop::Refused),
        Err(stop) => Err(stop),
    };
    match claimed {
        Ok(outbox) => {
            let user = outbox.user().to_owned();
            info!("[NEW CONNECTION] {user} connected from {addr}");
            let session = Session {
                shared: &shared,
                user: &user,
                outbox: &outbox,
                held: std::sync::Mutex::default(),
            };
            let end = run(&session, &mut reader, &kill).await;
            if let Ended::Frame(e) = &end {
                session.reply(ServerLine::Error {
                    reason: e.to_string(),
                });
            }
            shared.registry.remove_chat(&user, id);
            info!("[DISCONNECTED] {user} ({end})");
        }
        Err(Stop::Refused(refusal)) => {
            warn!("[REFUSED] {addr}: {refusal}");
            let line = ServerLine::Error {
                reason: refusal.to_string(),
            };
            queue.push(Bytes::from(line.to_wire()));
        }
        Err(Stop::Ended(_)) => {}
    }
    queue.close();
    let abort = writer.abort_handle();
    if tokio::time::timeout(FLUSH_GRACE, writer).await.is_err() {
        abort.abort();
    }
}

/// Claims a checked username and queues its welcome.
fn claim(
    shared: &Shared,
    name: &str,
    id: u64,
    addr: SocketAddr,
    queue: &Arc<SendQueue>,
    kill: &CancellationToken,
) -> Result<Outbox, Refusal> {
    let outbox = Outbox::new(name, queue.clone(), kill.clone());
    let welcome = Bytes::from(ServerLine::Welcome { user: name.into() }.to_wire());
    shared
        .registry
        .add_chat(name, id, addr.ip(), outbox.clone(), welcome)?;
    Ok(outbox)
}

/// Reads and answers commands until the connection ends; returns how it ended.
async fn run(session: &Session<'_>, reader: &mut LineReader, kill: &CancellationToken) -> Ended {
    loop {
        // A client can send thousands of commands in one read; let the writers that fan
        // them out run in between, so a flood is spread over time, not over queues.
        tokio::task::coop::consume_budget().await;
        let line = match reader.next_line(kill).await {
            Ok(line) => line,
            Err(end) => return end,
        };
        match std::str::from_utf8(&line) {
            Ok(text) => handle(session, text),
            Err(_) => session.refuse(Refusal::CommandNotUtf8),
        }
        // Flow control: past a recipient's high-water mark, this session reads no more of
        // its socket until that recipient has drained (or is found to take nothing).
        let held = std::mem::take(&mut *session.held());
        if !held.is_empty() {
            // Boxed: its state lives on the heap only while a session is held back, so an
            // idle session stays small.
            Box::pin(held.settle(FLOW_GRACE, kill)).await;
        }
    }
}

/// Answers one command line.
fn handle(session: &Session<'_>, text: &str) {
    match parse_command(text) {
        Ok(Parsed::Call(call)) => {
            debug!("[{}] {text}", session.user);
            match HANDLERS.iter().find(|(spec, _)| call.is(spec)) {
                Some((_, handler)) => handler(session, &call),
                None => unknown(session, call.spec.name, text),
            }
        }
        Ok(Parsed::Ack { sender, filename }) => ack(session, sender, filename),
        Ok(Parsed::Hello) => {
            session.outbox.extend();
            session.reply(ServerLine::Hello);
        }
        Ok(Parsed::FileFailed {
            sender,
            filename,
            reason,
        }) => not_saved(session, sender, filename, reason),
        Ok(Parsed::Unknown { word, .. }) => unknown(session, word, text),
        Err(CommandError::Empty) => {}
        Err(CommandError::Usage(spec)) => session.reply(ServerLine::Usage(spec)),
        Err(CommandError::MalformedAck) => session.refuse(Refusal::MalformedAck),
    }
}

/// Where every line whose first word names no command ends up.
fn unknown(session: &Session<'_>, word: &str, _line: &str) {
    debug!("[{}] unknown command {word:?}", session.user);
    session.reply(ServerLine::UnknownCommand);
}

fn msg(session: &Session<'_>, call: &Call<'_>) {
    let (to, text) = (normalize(call.arg(0)), call.arg(1));
    let to: &str = &to;
    let line = ServerLine::Private {
        from: session.user.into(),
        text: text.into(),
    };
    let bytes = Bytes::from(line.to_wire());
    if !session
        .shared
        .registry
        .send_to(to, bytes, &mut session.held())
    {
        session.reply(ServerLine::UserNotFound { user: to.into() });
    }
}

fn broadcast(session: &Session<'_>, call: &Call<'_>) {
    let line = ServerLine::Broadcast {
        from: session.user.into(),
        text: call.arg(0).into(),
    };
    let bytes = Bytes::from(line.to_wire());
    let mut held = session.held();
    session
        .shared
        .registry
        .broadcast(session.user, &bytes, &mut held);
}

fn list(session: &Session<'_>, _call: &Call<'_>) {
    let users = session.shared.registry.users_except(session.user);
    session.reply(ServerLine::Users { users });
}

fn join(session: &Session<'_>, call: &Call<'_>) {
    let group = normalize(call.arg(0));
    let group: &str = &group;
    let joined = check_group(group)
        .map_err(Refusal::from)
        .and_then(|()| session.shared.registry.join(group, session.user));
    match joined {
        Ok(()) => session.reply(ServerLine::Joined {
            group: group.into(),
        }),
        Err(refusal) => session.refuse(refusal),
    }
}

fn send_group(session: &Session<'_>, call: &Call<'_>) {
    let (group, text) = (normalize(call.arg(0)), call.arg(1));
    let group: &str = &group;
    let line = ServerLine::Group {
        group: group.into(),
        from: session.user.into(),
        text: text.into(),
    };
    let bytes = Bytes::from(line.to_wire());
    let sent = session
        .shared
        .registry
        .send_group(session.user, group, &bytes, &mut session.held());
    if !sent {
        session.reply(ServerLine::NotInGroup {
            group: group.into(),
        });
    }
}

fn leave(session: &Session<'_>, call: &Call<'_>) {
    let group = normalize(call.arg(0)).into_owned();
    let left = session.shared.registry.leave(&group, session.user);
    session.reply(match left {
        true => ServerLine::Left { group },
        false => ServerLine::NotInGroup { group },
    });
}

fn groups(session: &Session<'_>, _call: &Call<'_>) {
    let groups = session.shared.registry.groups_of(session.user);
    session.reply(ServerLine::Groups { groups });
}

fn members(session: &Session<'_>, call: &Call<'_>) {
    let group = normalize(call.arg(0)).into_owned();
    session.reply(
        match session.shared.registry.members(&group, session.user) {
            Some(members) => ServerLine::Members { group, members },
            None => ServerLine::NotInGroup { group },
        },
    );
}

/// `FILE_RECEIVED|<sender>|<filename>`: relayed to the sender as `[ACK]`, once per forward.
fn ack(session: &Session<'_>, sender: &str, filename: &str) {
    let registry = &session.shared.registry;
    if !registry.take_ack(session.user, sender, filename) {
        return session.refuse(Refusal::NoSuchAck {
            sender: sender.into(),
            filename: filename.into(),
        });
    }
    let ack = ServerLine::Ack {
        recipient: session.user.into(),
        filename: filename.into(),
    };
    registry.send_to(sender, Bytes::from(ack.to_wire()), &mut session.held());
}

/// `FILE_FAILED|<sender>|<filename>|<reason>`: the recipient could not save a file; its
/// uploader is told instead of waiting for an `[ACK]` that will not come.
fn not_saved(session: &Session<'_>, sender: &str, filename: &str, reason: &str) {
    let registry = &session.shared.registry;
    if !registry.take_ack(session.user, sender, filename) {
        return session.refuse(Refusal::NoSuchAck {
            sender: sender.into(),
            filename: filename.into(),
        });
    }
    warn!(
        "[FILE ERROR] {} could not save '{filename}' from {sender}: {reason}",
        session.user
    );
    let refusal = Refusal::NotSaved {
        filename: filename.into(),
        recipient: session.user.into(),
        reason: reason.into(),
    };
    let line = ServerLine::Error {
        reason: refusal.to_string(),
    };
    registry.send_to(sender, Bytes::from(line.to_wire()), &mut session.held());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::COMMANDS;

    #[test]
    fn every_command_of_the_protocol_has_exactly_one_handler() {
        for spec in COMMANDS {
            let n = HANDLERS.iter().filter(|(s, _)| s.name == spec.name).count();
            assert_eq!(n, 1, "{}", spec.name);
        }
        assert_eq!(HANDLERS.len(), COMMANDS.len());
    }
}

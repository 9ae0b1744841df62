//! Hooks: what an embedder (the Python layer, `relaychat.Server`) decides about the
//! server's events, and what it is told after them.
//!
//! The engine never waits on the embedder inside a network task's hot path: a question
//! ([`HookCall`]) goes into one bounded queue with a one-shot reply, and the session that
//! asked awaits the answer (at most its kind's time limit) before it reads its next
//! command, so a slow hook delays only its own user. The embedder drains the queue in
//! batches (one GIL round trip for many questions). Observations go into the same queue
//! without a reply; when it is full they are dropped (and counted), never waited for.
//!
//! A server without hooks has no [`Hooks`] at all: every call site checks one `Option`.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::metrics::{HookKind, Metrics};

/// Questions and observations that may wait for the embedder at once; past this, a
/// question gets its kind's failure policy and an observation is dropped.
pub const QUEUE: usize = 65_536;

/// How long a kind of question may take, and what a timeout (or an overloaded queue)
/// means.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// The time limit of one question.
    pub limit: Duration,
    /// Past the limit the event is allowed (`true`) or refused.
    pub fail_open: bool,
}

impl Policy {
    fn failed(&self, why: &str) -> Answer {
        match self.fail_open {
            true => Answer::Allow,
            false => Answer::Deny(format!("refused: a server hook {why}")),
        }
    }
}

/// A custom command the embedder answers: `name` (lower case), its usage and help line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomCommand {
    /// The first word that calls it (lower case; matched case-insensitively).
    pub name: String,
    /// How to call it, for `help` (e.g. `roll <dice>`).
    pub usage: String,
    /// One line on what it does, for `help`.
    pub help: String,
}

/// What the embedder hooks: each kind of question with its policy (`None`: not asked),
/// its commands, and whether it observes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HookSpec {
    /// Before a private, group or broadcast message is delivered.
    pub message: Option<Policy>,
    /// Before a login completes.
    pub login: Option<Policy>,
    /// Before an upload is taken.
    pub upload: Option<Policy>,
    /// Custom commands.
    pub commands: Vec<CustomCommand>,
    /// The custom commands' policy.
    pub command: Option<Policy>,
    /// Whether observations are sent.
    pub observe: bool,
}

/// Which kind of message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// `msg`.
    Private,
    /// `send_group`.
    Group,
    /// `broadcast`.
    Broadcast,
}

impl MessageKind {
    /// `private`, `group` or `broadcast`.
    pub fn name(self) -> &'static str {
        match self {
            MessageKind::Private => "private",
            MessageKind::Group => "group",
            MessageKind::Broadcast => "broadcast",
        }
    }
}

/// A question for the embedder, or (with no reply) an observation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookCall {
    /// May the sender send the text to the recipient (see [`MessageFields`])?
    #[allow(missing_docs)]
    Message {
        kind: MessageKind,
        fields: MessageFields,
    },
    /// May `name` log in from `addr`?
    #[allow(missing_docs)]
    Login {
        name: String,
        addr: IpAddr,
        registered: bool,
    },
    /// May `sender` upload `filename` (`size` bytes) to `target` (`user` or `GROUP:g`)?
    #[allow(missing_docs)]
    Upload {
        sender: String,
        target: String,
        filename: String,
        size: u64,
    },
    /// `caller` typed custom command `name` with `args`.
    #[allow(missing_docs)]
    Command {
        caller: String,
        name: String,
        args: String,
    },
    /// Something happened: `event` (connect, disconnect, join, leave, message, file_saved,
    /// file_acknowledged) and its fields.
    #[allow(missing_docs)]
    Observed {
        event: &'static str,
        fields: Vec<(&'static str, String)>,
    },
}

/// A message question's sender, recipient (a user, a group, or empty for everyone) and
/// text, kept in one allocation: a hooked message costs the engine one, not three.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageFields {
    all: String,
    sender_end: usize,
    to_end: usize,
}

impl MessageFields {
    /// The fields of `sender`'s message to `to`.
    pub fn new(sender: &str, to: &str, text: &str) -> Self {
        let mut all = String::with_capacity(sender.len() + to.len() + text.len());
        all.push_str(sender);
        all.push_str(to);
        all.push_str(text);
        MessageFields {
            all,
            sender_end: sender.len(),
            to_end: sender.len() + to.len(),
        }
    }

    /// Who sends it.
    pub fn sender(&self) -> &str {
        &self.all[..self.sender_end]
    }

    /// To whom: a user, a group, or empty for everyone.
    pub fn to(&self) -> &str {
        &self.all[self.sender_end..self.to_end]
    }

    /// What it says.
    pub fn text(&self) -> &str {
        &self.all[self.to_end..]
    }
}

/// The embedder's answer to a question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Let it happen.
    Allow,
    /// Refused: the user gets `ERROR: <reason>`.
    Deny(String),
    /// A message goes with this text instead.
    Rewrite(String),
    /// A command's answer: these lines to its caller.
    Reply(Vec<String>),
}

/// A question (or observation) waiting for the embedder.
pub struct Pending {
    /// What is asked (or told).
    pub call: HookCall,
    /// Where the answer goes (`None`: an observation).
    pub reply: Option<oneshot::Sender<Answer>>,
}

/// A question sent to the embedder, its answer still to come.
pub(crate) struct Asked {
    /// `None`: the queue was full.
    rx: Option<oneshot::Receiver<Answer>>,
    policy: Policy,
    kind: HookKind,
    started: std::time::Instant,
}

impl Asked {
    /// The answer if it needs no wait: it is in already (a pipelining session asks
    /// ahead), the embedder is gone, or the queue was full; counted in `metrics`.
    pub(crate) fn answered(&mut self, metrics: &Metrics) -> Option<Answer> {
        let got = match &mut self.rx {
            None => Err("is overloaded".to_owned()),
            Some(rx) => match rx.try_recv() {
                Ok(answer) => Ok(answer),
                Err(oneshot::error::TryRecvError::Closed) => Err("is gone".to_owned()),
                Err(oneshot::error::TryRecvError::Empty) => return None,
            },
        };
        Some(self.settle(got, metrics))
    }

    /// The answer, within the policy's limit from when it was asked (else the policy's
    /// own); counted in `metrics`.
    pub(crate) async fn answer(mut self, metrics: &Metrics) -> Answer {
        if let Some(answer) = self.answered(metrics) {
            return answer;
        }
        let deadline = tokio::time::Instant::from_std(self.started + self.policy.limit);
        let got = match self.rx.take() {
            None => Err("is gone".to_owned()),
            Some(rx) => match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(answer)) => Ok(answer),
                Ok(Err(_)) => Err("is gone".to_owned()),
                Err(_) => Err(format!("took longer than {:?}", self.policy.limit)),
            },
        };
        self.settle(got, metrics)
    }

    /// `got`, or the policy's answer for why there is none; counted in `metrics`.
    fn settle(&self, got: Result<Answer, String>, metrics: &Metrics) -> Answer {
        metrics.hook(self.kind, self.started.elapsed(), got.is_err());
        got.unwrap_or_else(|why| self.policy.failed(&why))
    }
}

/// The engine's side of the hooks.
pub struct Hooks {
    /// What is hooked.
    pub spec: HookSpec,
    tx: mpsc::Sender<Pending>,
    /// Observations dropped because the queue was full.
    dropped: AtomicU64,
}

impl Hooks {
    /// Hooks as `spec` says, and the queue the embedder drains.
    pub fn new(spec: HookSpec) -> (Hooks, mpsc::Receiver<Pending>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let hooks = Hooks {
            spec,
            tx,
            dropped: AtomicU64::new(0),
        };
        (hooks, rx)
    }

    /// Asks the embedder and waits for its answer, at most `policy.limit`; counts the
    /// question in `metrics`.
    pub(crate) async fn ask(&self, call: HookCall, policy: Policy, metrics: &Metrics) -> Answer {
        self.send(call, policy).answer(metrics).await
    }

    /// Asks the embedder now; the answer is awaited later ([`Asked::answer`]), so a
    /// session can ask about several pipelined commands at once.
    pub(crate) fn send(&self, call: HookCall, policy: Policy) -> Asked {
        let kind = match &call {
            HookCall::Message { .. } => HookKind::Message,
            HookCall::Login { .. } => HookKind::Login,
            HookCall::Upload { .. } => HookKind::Upload,
            _ => HookKind::Command,
        };
        let (tx, rx) = oneshot::channel();
        let pending = Pending {
            call,
            reply: Some(tx),
        };
        Asked {
            rx: self.tx.try_send(pending).ok().map(|()| rx),
            policy,
            kind,
            started: std::time::Instant::now(),
        }
    }

    /// Tells the embedder something happened (if it observes), without waiting.
    pub(crate) fn observe(&self, event: &'static str, fields: Vec<(&'static str, String)>) {
        if !self.spec.observe {
            return;
        }
        let pending = Pending {
            call: HookCall::Observed { event, fields },
            reply: None,
        };
        if self.tx.try_send(pending).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The custom command called `name`, if there is one.
    pub(crate) fn command(&self, name: &str) -> Option<&CustomCommand> {
        self.spec.commands.iter().find(|c| c.name == name)
    }

    /// Observations dropped so far because the embedder fell behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLOSED: Policy = Policy {
        limit: Duration::from_millis(50),
        fail_open: false,
    };

    #[tokio::test]
    async fn an_answer_comes_back_and_silence_gets_the_policy() {
        let (hooks, mut rx) = Hooks::new(HookSpec::default());
        let call = HookCall::Command {
            caller: "a".into(),
            name: "roll".into(),
            args: String::new(),
        };
        let answering = tokio::spawn(async move {
            let pending = rx.recv().await.expect("asked");
            let reply = pending.reply.expect("a question");
            reply.send(Answer::Reply(vec!["4".into()])).expect("sent");
            // The next question is never answered.
            rx.recv().await.expect("asked again")
        });
        assert_eq!(
            hooks.ask(call.clone(), CLOSED, &Metrics::new()).await,
            Answer::Reply(vec!["4".into()])
        );
        assert!(
            matches!(hooks.ask(call.clone(), CLOSED, &Metrics::new()).await, Answer::Deny(why) if why.contains("took longer"))
        );
        drop(answering.await.expect("task"));
        let open = Policy {
            fail_open: true,
            ..CLOSED
        };
        assert_eq!(
            hooks.ask(call, open, &Metrics::new()).await,
            Answer::Allow,
            "the embedder is gone"
        );
    }

    #[test]
    fn observations_never_wait_and_are_counted_when_dropped() {
        let spec = HookSpec {
            observe: true,
            ..HookSpec::default()
        };
        let (hooks, rx) = Hooks::new(spec);
        for _ in 0..QUEUE + 3 {
            hooks.observe("connect", vec![("user", "a".into())]);
        }
        assert_eq!(hooks.dropped(), 3);
        drop(rx);
    }
}

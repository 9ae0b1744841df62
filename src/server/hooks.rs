//! Hooks: what an embedder (the Python layer, `relaychat.Server`) decides about the
//! server's events, and what it is told after them.
//!
//! The engine never waits on the embedder inside a network task's hot path: a question
//! ([`HookCall`]) goes into one bounded queue with a [`Reply`], and the session that asked
//! awaits the answer (at most its kind's time limit) before it reads its next command, so
//! a slow hook delays only its own user. The questions a session asks together (the
//! pipelined lines it reads ahead) share one [`Group`]: one allocation for their answers,
//! and one wake-up of the session for those that come back together. The embedder drains the queue in
//! batches (one GIL round trip for many questions). Observations go into the same queue
//! without a reply; when it is full they are dropped (and counted), never waited for.
//!
//! A server without hooks has no [`Hooks`] at all: every call site checks one `Option`.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

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
    pub reply: Option<Reply>,
}

/// Questions a group holds at most; the next question starts a new group.
pub(crate) const GROUP: usize = 64;

/// The answers to questions one session asked together, in the order asked, and the
/// session's task to wake when one comes in.
pub struct Group {
    state: Mutex<GroupState>,
    policy: Policy,
    kind: HookKind,
}

struct GroupState {
    /// Each question's: when it was asked, and what became of it.
    slots: Vec<(Instant, Slot)>,
    waker: Option<Waker>,
}

enum Slot {
    Waiting,
    Answered(Answer),
    /// No answer will come: why (`is gone`, `is overloaded`).
    Failed(&'static str),
    /// The asker has it.
    Taken,
}

impl Group {
    fn new(policy: Policy, kind: HookKind, room: usize) -> Arc<Group> {
        Arc::new(Group {
            state: Mutex::new(GroupState {
                slots: Vec::with_capacity(room),
                waker: None,
            }),
            policy,
            kind,
        })
    }

    fn state(&self) -> MutexGuard<'_, GroupState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Settles question `index` as `slot` (if it still waits) and wakes its asker.
    fn settle(&self, index: usize, slot: Slot) {
        let waker = {
            let mut st = self.state();
            match st.slots.get_mut(index) {
                Some((_, waiting @ Slot::Waiting)) => *waiting = slot,
                _ => return,
            }
            st.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// Where the answer to one question goes: given once; dropped unanswered, the question
/// fails as `is gone`.
pub struct Reply {
    group: Option<Arc<Group>>,
    index: usize,
}

impl Reply {
    /// Hands `answer` to the session that asked (it may have given up at its time limit:
    /// nothing to do then).
    pub fn send(mut self, answer: Answer) {
        if let Some(group) = self.group.take() {
            group.settle(self.index, Slot::Answered(answer));
        }
    }

    fn fail(mut self, why: &'static str) {
        if let Some(group) = self.group.take() {
            group.settle(self.index, Slot::Failed(why));
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if let Some(group) = self.group.take() {
            group.settle(self.index, Slot::Failed("is gone"));
        }
    }
}

/// A question sent to the embedder, its answer still to come.
pub(crate) struct Asked {
    group: Arc<Group>,
    index: usize,
}

impl Asked {
    /// The question's outcome, taken, if it has one; else `cx`'s task is woken when it may.
    fn take(&self, cx: Option<&Context<'_>>) -> Option<(Instant, Result<Answer, &'static str>)> {
        let mut st = self.group.state();
        let st = &mut *st;
        let (asked, slot) = st.slots.get_mut(self.index)?;
        let got = match std::mem::replace(slot, Slot::Taken) {
            Slot::Answered(answer) => Ok(answer),
            Slot::Failed(why) => Err(why),
            Slot::Taken => Err("is gone"),
            Slot::Waiting => {
                *slot = Slot::Waiting;
                if let Some(cx) = cx {
                    match &mut st.waker {
                        Some(waker) if waker.will_wake(cx.waker()) => {}
                        waker => *waker = Some(cx.waker().clone()),
                    }
                }
                return None;
            }
        };
        Some((*asked, got))
    }

    /// The answer if it needs no wait: it is in already (a pipelining session asks
    /// ahead), the embedder is gone, or the queue was full; counted in `metrics`.
    pub(crate) fn answered(&mut self, metrics: &Metrics) -> Option<Answer> {
        let (asked, got) = self.take(None)?;
        Some(self.settled(asked, got.map_err(str::to_owned), metrics))
    }

    /// The answer, within the policy's limit from when it was asked (else the policy's
    /// own); counted in `metrics`.
    pub(crate) async fn answer(mut self, metrics: &Metrics) -> Answer {
        if let Some(answer) = self.answered(metrics) {
            return answer;
        }
        let policy = self.group.policy;
        let asked = self.group.state().slots[self.index].0;
        let deadline = tokio::time::Instant::from_std(asked + policy.limit);
        let came = std::future::poll_fn(|cx| match self.take(Some(cx)) {
            Some(outcome) => Poll::Ready(outcome),
            None => Poll::Pending,
        });
        let got = match tokio::time::timeout_at(deadline, came).await {
            Ok((_, got)) => got.map_err(str::to_owned),
            Err(_) => Err(format!("took longer than {:?}", policy.limit)),
        };
        self.settled(asked, got, metrics)
    }

    /// `got`, or the policy's answer for why there is none; counted in `metrics`.
    fn settled(&self, asked: Instant, got: Result<Answer, String>, metrics: &Metrics) -> Answer {
        metrics.hook(self.group.kind, asked.elapsed(), got.is_err());
        got.unwrap_or_else(|why| self.group.policy.failed(&why))
    }
}

/// Which kind of question `call` is.
fn kind_of(call: &HookCall) -> HookKind {
    match call {
        HookCall::Message { .. } => HookKind::Message,
        HookCall::Login { .. } => HookKind::Login,
        HookCall::Upload { .. } => HookKind::Upload,
        _ => HookKind::Command,
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

    /// Asks the embedder now; the answer is awaited later ([`Asked::answer`]).
    pub(crate) fn send(&self, call: HookCall, policy: Policy) -> Asked {
        let group = Group::new(policy, kind_of(&call), 1);
        self.enqueue(group, call)
    }

    /// Asks the embedder now, the question one of the asker's `group` (a new one when
    /// there is none yet, or it is full), so a session can ask about several pipelined
    /// commands at once.
    pub(crate) fn send_in(
        &self,
        group: &mut Option<Arc<Group>>,
        call: HookCall,
        policy: Policy,
    ) -> Asked {
        let kind = kind_of(&call);
        let current = group
            .as_ref()
            .filter(|g| g.policy == policy && g.kind == kind && g.state().slots.len() < GROUP);
        let group = match current {
            Some(g) => g.clone(),
            None => group.insert(Group::new(policy, kind, GROUP)).clone(),
        };
        self.enqueue(group, call)
    }

    /// Queues `call` as the next question of `group`.
    fn enqueue(&self, group: Arc<Group>, call: HookCall) -> Asked {
        let index = {
            let mut st = group.state();
            st.slots.push((Instant::now(), Slot::Waiting));
            st.slots.len() - 1
        };
        let reply = Reply {
            group: Some(group.clone()),
            index,
        };
        let pending = Pending {
            call,
            reply: Some(reply),
        };
        if let Err(e) = self.tx.try_send(pending) {
            if let Some(reply) = e.into_inner().reply {
                reply.fail("is overloaded");
            }
        }
        Asked { group, index }
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
            reply.send(Answer::Reply(vec!["4".into()]));
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

    fn message(text: &str) -> HookCall {
        HookCall::Message {
            kind: MessageKind::Private,
            fields: MessageFields::new("a", "b", text),
        }
    }

    #[tokio::test]
    async fn questions_asked_together_get_each_its_own_answer_in_any_order() {
        let (hooks, mut rx) = Hooks::new(HookSpec::default());
        let metrics = Metrics::new();
        let mut group = None;
        let mut asked: Vec<Asked> = (0..GROUP + 2)
            .map(|i| hooks.send_in(&mut group, message(&i.to_string()), CLOSED))
            .collect();
        // One group holds GROUP questions; the next ones start another.
        assert!(Arc::ptr_eq(&asked[0].group, &asked[GROUP - 1].group));
        assert!(!Arc::ptr_eq(&asked[0].group, &asked[GROUP].group));
        let mut replies = Vec::new();
        while let Ok(pending) = rx.try_recv() {
            replies.push(pending.reply.expect("a question"));
        }
        assert_eq!(replies.len(), GROUP + 2);
        assert_eq!(asked[1].answered(&metrics), None, "no answer yet");
        // Answered backwards; question 1's reply is dropped unanswered.
        let gone = replies.remove(1);
        for (i, reply) in replies.into_iter().enumerate().rev() {
            let i = if i == 0 { 0 } else { i + 1 };
            reply.send(Answer::Rewrite(format!("answer {i}")));
        }
        drop(gone);
        let last = asked.pop().expect("asked");
        assert_eq!(
            last.answer(&metrics).await,
            Answer::Rewrite(format!("answer {}", GROUP + 1))
        );
        for (i, a) in asked.into_iter().enumerate() {
            let answer = a.answer(&metrics).await;
            match i {
                1 => assert!(matches!(answer, Answer::Deny(why) if why.contains("is gone"))),
                _ => assert_eq!(answer, Answer::Rewrite(format!("answer {i}"))),
            }
        }
    }

    #[tokio::test]
    async fn a_waiting_asker_is_woken_by_its_answer() {
        let (hooks, mut rx) = Hooks::new(HookSpec::default());
        let mut group = None;
        let first = hooks.send_in(&mut group, message("1"), CLOSED);
        let second = hooks.send_in(&mut group, message("2"), CLOSED);
        let (one, two) = (rx.recv().await.expect("1"), rx.recv().await.expect("2"));
        let waiting = tokio::spawn(async move {
            let metrics = Metrics::new();
            (first.answer(&metrics).await, second.answer(&metrics).await)
        });
        tokio::task::yield_now().await;
        two.reply.expect("2").send(Answer::Deny("no".into()));
        one.reply.expect("1").send(Answer::Allow);
        assert_eq!(
            waiting.await.expect("task"),
            (Answer::Allow, Answer::Deny("no".into()))
        );
    }

    #[test]
    fn a_full_queue_answers_with_the_policy_at_once() {
        let (hooks, _rx) = Hooks::new(HookSpec::default());
        let metrics = Metrics::new();
        let mut group = None;
        for _ in 0..QUEUE {
            drop(hooks.send_in(&mut group, message("fills"), CLOSED));
        }
        let mut over = hooks.send_in(&mut group, message("over"), CLOSED);
        assert!(
            matches!(over.answered(&metrics), Some(Answer::Deny(why)) if why.contains("is overloaded"))
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

//! Hooks: what an embedder (the Python layer, `relaychat.Server`) decides about the
//! server's events, and what it is told after them.
//!
//! The engine never waits on the embedder inside a network task's hot path: a question
//! ([`HookCall`]) goes into one queue (at most [`QUEUE`] questions and observations) with a
//! [`Reply`], and the session that asked awaits the answer (at most its kind's time limit)
//! before it reads its next command, so a slow hook delays only its own user. The
//! questions a session asks together (the pipelined lines it reads ahead) go into the
//! queue as one entry, and share one [`Group`]: one allocation for their answers, and one
//! wake-up of the session for those that come back together. The embedder drains the
//! queue in batches (one GIL round trip for many questions). Observations go into the same
//! queue without a reply; when it is full they are dropped (and counted), never waited for.
//!
//! A server without hooks has no [`Hooks`] at all: every call site checks one `Option`.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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

/// A question for the embedder.
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

/// Questions, or an observation, waiting for the embedder.
pub enum Pending {
    /// Questions asked together, in order; their answers go to `replies`, in order.
    #[allow(missing_docs)]
    Questions {
        calls: Vec<HookCall>,
        replies: Replies,
    },
    /// Something happened: `event` (connect, disconnect, join, leave, message, file_saved,
    /// file_acknowledged) and its fields. No answer.
    #[allow(missing_docs)]
    Observed {
        event: &'static str,
        fields: Vec<(&'static str, String)>,
    },
}

impl Pending {
    /// How many questions (or observations) it is.
    pub fn count(&self) -> usize {
        match self {
            Pending::Questions { calls, .. } => calls.len(),
            Pending::Observed { .. } => 1,
        }
    }
}

/// Questions a group holds at most; the next question starts a new group.
pub(crate) const GROUP: usize = 64;

/// The answers to questions one session asked together, in the order asked, and the
/// session's task to wake when one comes in.
pub struct Group {
    state: Mutex<GroupState>,
    policy: Policy,
    kind: HookKind,
    /// Questions it holds at most.
    room: usize,
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
            room,
        })
    }

    fn state(&self) -> MutexGuard<'_, GroupState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The index of a new question asked at `at`, if the group has room for it.
    fn reserve(&self, at: Instant) -> Option<usize> {
        let mut st = self.state();
        (st.slots.len() < self.room).then(|| {
            st.slots.push((at, Slot::Waiting));
            st.slots.len() - 1
        })
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

/// Where the answers to questions asked together go: one [`Reply`] each, in order. Those
/// not taken fail as `is gone` when it is dropped.
pub struct Replies {
    group: Arc<Group>,
    next: usize,
    end: usize,
}

impl Iterator for Replies {
    type Item = Reply;

    fn next(&mut self) -> Option<Reply> {
        (self.next < self.end).then(|| {
            self.next += 1;
            Reply {
                group: Some(self.group.clone()),
                index: self.next - 1,
            }
        })
    }
}

impl Drop for Replies {
    fn drop(&mut self) {
        self.by_ref().for_each(drop);
    }
}

/// The questions a session has asked but not yet sent ([`Hooks::ask_in`]); they go to
/// the embedder together ([`Hooks::send_burst`]).
#[derive(Default)]
pub(crate) struct Burst {
    group: Option<Arc<Group>>,
    first: usize,
    calls: Vec<HookCall>,
    at: Option<Instant>,
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
        HookCall::Command { .. } => HookKind::Command,
    }
}

/// The embedder's end of the queue.
pub struct HookQueue {
    rx: mpsc::UnboundedReceiver<Pending>,
    waiting: Arc<AtomicUsize>,
}

impl HookQueue {
    /// The next entry; `None` when the hooks are gone.
    pub async fn recv(&mut self) -> Option<Pending> {
        let pending = self.rx.recv().await?;
        self.waiting.fetch_sub(pending.count(), Ordering::Relaxed);
        Some(pending)
    }

    /// The next entry, if one is waiting.
    pub fn try_recv(&mut self) -> Option<Pending> {
        let pending = self.rx.try_recv().ok()?;
        self.waiting.fetch_sub(pending.count(), Ordering::Relaxed);
        Some(pending)
    }
}

/// The engine's side of the hooks.
pub struct Hooks {
    /// What is hooked.
    pub spec: HookSpec,
    tx: mpsc::UnboundedSender<Pending>,
    /// Questions and observations in the queue (at most [`QUEUE`]).
    waiting: Arc<AtomicUsize>,
    /// Observations dropped because the queue was full.
    dropped: AtomicU64,
}

impl Hooks {
    /// Hooks as `spec` says, and the queue the embedder drains.
    pub fn new(spec: HookSpec) -> (Hooks, HookQueue) {
        let (tx, rx) = mpsc::unbounded_channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        let hooks = Hooks {
            spec,
            tx,
            waiting: waiting.clone(),
            dropped: AtomicU64::new(0),
        };
        (hooks, HookQueue { rx, waiting })
    }

    /// Asks the embedder and waits for its answer, at most `policy.limit`; counts the
    /// question in `metrics`.
    pub(crate) async fn ask(&self, call: HookCall, policy: Policy, metrics: &Metrics) -> Answer {
        self.send(call, policy).answer(metrics).await
    }

    /// Asks the embedder now; the answer is awaited later ([`Asked::answer`]).
    pub(crate) fn send(&self, call: HookCall, policy: Policy) -> Asked {
        let group = Group::new(policy, kind_of(&call), 1);
        let index = group.reserve(Instant::now()).unwrap_or_default();
        let replies = Replies {
            group: group.clone(),
            next: index,
            end: index + 1,
        };
        self.queue(Pending::Questions {
            calls: vec![call],
            replies,
        });
        Asked { group, index }
    }

    /// Asks the embedder as one of `burst`, sent at [`Hooks::send_burst`]: a session asks
    /// about several pipelined commands at once. The answer is awaited later, after the
    /// burst was sent.
    pub(crate) fn ask_in(&self, burst: &mut Burst, call: HookCall, policy: Policy) -> Asked {
        let kind = kind_of(&call);
        let at = *burst.at.get_or_insert_with(Instant::now);
        let joined = burst
            .group
            .as_ref()
            .filter(|g| g.policy == policy && g.kind == kind)
            .and_then(|g| Some((g.clone(), g.reserve(at)?)));
        let (group, index) = match joined {
            Some(joined) => joined,
            None => {
                self.send_burst(burst);
                let group = Group::new(policy, kind, GROUP);
                let index = group.reserve(at).unwrap_or_default();
                burst.group = Some(group.clone());
                (group, index)
            }
        };
        if burst.calls.is_empty() {
            burst.first = index;
        }
        burst.calls.push(call);
        Asked { group, index }
    }

    /// Sends the questions of `burst` asked since it was last sent.
    pub(crate) fn send_burst(&self, burst: &mut Burst) {
        burst.at = None;
        let (Some(group), false) = (&burst.group, burst.calls.is_empty()) else {
            return;
        };
        let calls = std::mem::take(&mut burst.calls);
        let replies = Replies {
            group: group.clone(),
            next: burst.first,
            end: burst.first + calls.len(),
        };
        self.queue(Pending::Questions { calls, replies });
    }

    /// Queues `pending`, if the queue has room for it: else its questions fail as
    /// `is overloaded` (an observation is dropped, and counted).
    fn queue(&self, pending: Pending) {
        let n = pending.count();
        if self.waiting.fetch_add(n, Ordering::Relaxed) + n > QUEUE {
            self.waiting.fetch_sub(n, Ordering::Relaxed);
            return self.overloaded(pending);
        }
        if let Err(e) = self.tx.send(pending) {
            // The embedder is gone: its questions fail as such when they are dropped.
            self.waiting.fetch_sub(n, Ordering::Relaxed);
            drop(e);
        }
    }

    fn overloaded(&self, pending: Pending) {
        match pending {
            Pending::Questions { replies, .. } => {
                replies.for_each(|reply| reply.fail("is overloaded"));
            }
            Pending::Observed { .. } => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Tells the embedder something happened (if it observes), without waiting.
    pub(crate) fn observe(&self, event: &'static str, fields: Vec<(&'static str, String)>) {
        if self.spec.observe {
            self.queue(Pending::Observed { event, fields });
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
            let mut replies = replies(rx.recv().await.expect("asked"));
            replies.remove(0).send(Answer::Reply(vec!["4".into()]));
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

    /// The replies of a batch of questions.
    fn replies(pending: Pending) -> Vec<Reply> {
        match pending {
            Pending::Questions { replies, .. } => replies.collect(),
            Pending::Observed { .. } => panic!("an observation"),
        }
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
        let mut burst = Burst::default();
        let mut asked: Vec<Asked> = (0..GROUP + 2)
            .map(|i| hooks.ask_in(&mut burst, message(&i.to_string()), CLOSED))
            .collect();
        // One group holds GROUP questions; the next ones start another, and the questions
        // of the first go to the embedder then, as one entry.
        assert!(Arc::ptr_eq(&asked[0].group, &asked[GROUP - 1].group));
        assert!(!Arc::ptr_eq(&asked[0].group, &asked[GROUP].group));
        let first = rx.try_recv().expect("the first group's questions");
        assert_eq!(first.count(), GROUP);
        assert!(rx.try_recv().is_none(), "the rest wait for send_burst");
        hooks.send_burst(&mut burst);
        let second = rx.try_recv().expect("the rest");
        assert_eq!(second.count(), 2);
        let mut replies = replies(first);
        replies.extend(self::replies(second));
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
        let mut burst = Burst::default();
        let first = hooks.ask_in(&mut burst, message("1"), CLOSED);
        let second = hooks.ask_in(&mut burst, message("2"), CLOSED);
        hooks.send_burst(&mut burst);
        let mut both = replies(rx.recv().await.expect("asked"));
        let (one, two) = (both.remove(0), both.remove(0));
        let waiting = tokio::spawn(async move {
            let metrics = Metrics::new();
            (first.answer(&metrics).await, second.answer(&metrics).await)
        });
        tokio::task::yield_now().await;
        two.send(Answer::Deny("no".into()));
        one.send(Answer::Allow);
        assert_eq!(
            waiting.await.expect("task"),
            (Answer::Allow, Answer::Deny("no".into()))
        );
    }

    #[test]
    fn a_full_queue_answers_with_the_policy_at_once() {
        let (hooks, _rx) = Hooks::new(HookSpec::default());
        let metrics = Metrics::new();
        for _ in 0..QUEUE {
            drop(hooks.send(message("fills"), CLOSED));
        }
        let mut over = hooks.send(message("over"), CLOSED);
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

//! The engine's side of `relaychat.Server`'s hooks: the questions and observations of
//! [`crate::server::hooks`] handed to Python in batches (one GIL round trip for many
//! questions), their answers handed back together (one wake-up of the engine for many),
//! yet never held for long. The hooks themselves (decorators, plugins, rate limits, time
//! limits of async hooks) live in `python/relaychat/server.py`.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString, PyTuple};

use crate::protocol::server_line::one_line;
use crate::server::hooks::{Answer, HookCall, HookQueue, MessageKind, Pending, Reply};

use super::wait::runtime;

/// Questions handed to Python at most at once.
pub(super) const BATCH: usize = 512;

/// Answers are handed to the sessions that asked together: at `flush()` (a dispatcher's
/// run through a batch ends), or at most this long after the first of them was given, so
/// an answer never waits for a slow hook that runs after it.
const HOLD: Duration = Duration::from_millis(1);

/// The questions of one batch, each to be answered once.
#[pyclass(module = "relaychat._native", frozen)]
pub struct HookBatch {
    slots: Arc<Mutex<Slots>>,
}

/// A batch's replies: those still to be answered (`None`: answered), and answers given but
/// not yet handed over.
struct Slots {
    replies: Vec<Option<Reply>>,
    given: Vec<(Reply, Answer)>,
}

impl Slots {
    /// Hands the answers given so far to their askers (one wake-up of the engine for
    /// many; the asker may have given up at its time limit: nothing to do then).
    fn hand_over(&mut self) {
        for (reply, answer) in self.given.drain(..) {
            reply.send(answer);
        }
    }
}

#[pymethods]
impl HookBatch {
    /// Answers question `index`: `None` lets it happen; `("deny", reason)` refuses it
    /// (the user gets `ERROR: <reason>`); `("rewrite", text)` sends a message with `text`
    /// instead; `("reply", lines)` answers a command with `lines`. The answer goes out at
    /// the next `flush()`, or within a millisecond.
    fn answer(&self, index: usize, answer: &Bound<'_, PyAny>) -> PyResult<()> {
        let answer = match answer.is_none() {
            true => Answer::Allow,
            false => decision(answer)?,
        };
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let all = slots.replies.len();
        let tx = match slots.replies.get_mut(index).map(Option::take) {
            Some(Some(tx)) => tx,
            Some(None) => {
                return Err(PyRuntimeError::new_err(format!(
                    "question {index} was already answered"
                )));
            }
            None => {
                return Err(PyValueError::new_err(format!(
                    "no question {index} in a batch of {all}"
                )));
            }
        };
        slots.given.push((tx, answer));
        if slots.given.len() == 1 {
            // The first answer held: it goes out within HOLD whatever comes after it.
            let held = Arc::downgrade(&self.slots);
            runtime().spawn(async move {
                tokio::time::sleep(HOLD).await;
                if let Some(slots) = held.upgrade() {
                    slots
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .hand_over();
                }
            });
        }
        Ok(())
    }

    /// Hands the answers given so far to the sessions that asked.
    fn flush(&self) {
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .hand_over();
    }

    fn __len__(&self) -> usize {
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .replies
            .len()
    }

    fn __repr__(&self) -> String {
        let slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let open = slots.replies.iter().filter(|r| r.is_some()).count();
        format!(
            "HookBatch({} questions, {open} unanswered)",
            slots.replies.len()
        )
    }
}

impl Drop for HookBatch {
    fn drop(&mut self) {
        // Answers given are never lost (the held timer holds only a weak reference).
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .hand_over();
    }
}

/// One answer that is not a plain allow: `(verb, value)`.
fn decision(item: &Bound<'_, PyAny>) -> PyResult<Answer> {
    let (verb, value): (String, Bound<'_, PyAny>) = item.extract()?;
    Ok(match verb.as_str() {
        "deny" => Answer::Deny(one_line(&value.extract::<String>()?)),
        "rewrite" => Answer::Rewrite(value.extract()?),
        "reply" => Answer::Reply(value.extract()?),
        _ => {
            return Err(PyValueError::new_err(format!(
                "an answer is None, or ('deny' | 'rewrite' | 'reply', value), not {verb:?}"
            )));
        }
    })
}

/// What `_next_hooks` hands Python: the batch to answer, its questions in order as
/// `(kind, args)` (`kind`: `message`, `login`, `upload` or `command`; `args`: the
/// fields in order, as `Message`, `Login`, `Upload` take them, a command's caller, name
/// and args), and the observations among them, in order, each its fields by name
/// (`event` its name).
pub(super) type Taken<'py> = (
    HookBatch,
    Vec<(Bound<'py, PyString>, Bound<'py, PyTuple>)>,
    Vec<Bound<'py, PyDict>>,
);

/// Splits what the engine sent into questions (with their batch) and observations.
pub(super) fn taken(py: Python<'_>, pending: Vec<Pending>) -> PyResult<Taken<'_>> {
    let asked = pending.iter().map(Pending::count).sum();
    let mut replies = Vec::with_capacity(asked);
    let mut questions = Vec::with_capacity(asked);
    let mut observations = Vec::new();
    // A pipelining session's messages come one after another, mostly from one sender to
    // one recipient: those names are made once for all of them.
    let (mut sender, mut to) = (Names::default(), Names::default());
    for pending in pending {
        let (calls, to_answer) = match pending {
            Pending::Questions { calls, replies } => (calls, replies),
            Pending::Observed { event, fields } => {
                let d = PyDict::new(py);
                d.set_item("event", event)?;
                for (key, value) in fields {
                    d.set_item(key, value)?;
                }
                observations.push(d);
                continue;
            }
        };
        for (call, reply) in calls.into_iter().zip(to_answer) {
            let question = match call {
                HookCall::Message { kind, fields } => {
                    // The kinds' names are made once (interned), not for every message.
                    let kind = match kind {
                        MessageKind::Private => intern!(py, "private"),
                        MessageKind::Group => intern!(py, "group"),
                        MessageKind::Broadcast => intern!(py, "broadcast"),
                    };
                    let args = (
                        kind,
                        sender.get(py, fields.sender()),
                        to.get(py, fields.to()),
                        fields.text(),
                    );
                    (intern!(py, "message").clone(), args.into_pyobject(py)?)
                }
                HookCall::Login {
                    name,
                    addr,
                    registered,
                } => (
                    intern!(py, "login").clone(),
                    (name, addr.to_string(), registered).into_pyobject(py)?,
                ),
                HookCall::Upload {
                    sender,
                    target,
                    filename,
                    size,
                } => (
                    intern!(py, "upload").clone(),
                    (sender, target, filename, size).into_pyobject(py)?,
                ),
                HookCall::Command { caller, name, args } => {
                    let args = (caller, name, args).into_pyobject(py)?;
                    (intern!(py, "command").clone(), args)
                }
            };
            questions.push(question);
            replies.push(Some(reply));
        }
    }
    let batch = HookBatch {
        slots: Arc::new(Mutex::new(Slots {
            replies,
            given: Vec::new(),
        })),
    };
    Ok((batch, questions, observations))
}

/// The Python string of the name seen last, made again only for another name.
#[derive(Default)]
struct Names<'py> {
    last: Option<(String, Bound<'py, PyString>)>,
}

impl<'py> Names<'py> {
    fn get(&mut self, py: Python<'py>, name: &str) -> Bound<'py, PyString> {
        match &self.last {
            Some((last, made)) if last == name => made.clone(),
            _ => {
                let made = PyString::new(py, name);
                self.last = Some((name.to_owned(), made.clone()));
                made
            }
        }
    }
}

/// Waits up to `limit` for the first pending request, then takes what else is waiting (at
/// most [`BATCH`] in all). `None`: the hooks are gone.
pub(super) async fn next_batch(
    queue: Arc<tokio::sync::Mutex<HookQueue>>,
    limit: Duration,
) -> Option<Vec<Pending>> {
    // The limit covers the wait for the queue too: several threads take batches in turn.
    let deadline = tokio::time::Instant::now() + limit;
    let Ok(mut queue) = tokio::time::timeout_at(deadline, queue.lock()).await else {
        return Some(Vec::new());
    };
    let first = match tokio::time::timeout_at(deadline, queue.recv()).await {
        Ok(Some(first)) => first,
        Ok(None) => return None,
        Err(_) => return Some(Vec::new()),
    };
    let mut taken = first.count();
    let mut batch = vec![first];
    while taken < BATCH {
        match queue.try_recv() {
            Some(pending) => {
                taken += pending.count();
                batch.push(pending);
            }
            None => break,
        }
    }
    Some(batch)
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<HookBatch>()
}

//! The engine's side of `relaychat.Server`'s hooks: the questions and observations of
//! [`crate::server::hooks`] as `HookRequest` objects, handed to Python in batches, each
//! answered once. The hooks themselves (decorators, plugins, rate limits, time limits of
//! async hooks) live in `python/relaychat/server.py`.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use tokio::sync::oneshot;

use crate::protocol::server_line::one_line;
use crate::server::hooks::{Answer, HookCall, Pending};

/// Questions handed to Python at most at once.
pub(super) const BATCH: usize = 512;

/// A question the server asks its hooks (answer it once: `allow()`, `deny(reason)`,
/// `rewrite(text)` or `reply(lines)`), or an observation (`kind == "observed"`, nothing to
/// answer).
#[pyclass(module = "relaychat._native", frozen)]
pub struct HookRequest {
    call: HookCall,
    reply: Mutex<Option<oneshot::Sender<Answer>>>,
}

impl HookRequest {
    pub(super) fn new(pending: Pending) -> Self {
        Self {
            call: pending.call,
            reply: Mutex::new(pending.reply),
        }
    }

    fn answer(&self, answer: Answer) -> PyResult<()> {
        let reply = self
            .reply
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match reply {
            // The asker may have given up (its time limit): nothing to do.
            Some(tx) => {
                let _ = tx.send(answer);
                Ok(())
            }
            None => Err(PyRuntimeError::new_err(
                "this request was already answered, or needs no answer",
            )),
        }
    }
}

#[pymethods]
impl HookRequest {
    /// `message`, `login`, `upload`, `command`, or `observed`.
    #[getter]
    fn kind(&self) -> &'static str {
        match &self.call {
            HookCall::Message { .. } => "message",
            HookCall::Login { .. } => "login",
            HookCall::Upload { .. } => "upload",
            HookCall::Command { .. } => "command",
            HookCall::Observed { .. } => "observed",
        }
    }

    /// The request's fields in order, as `Message`, `Login`, `Upload` take them (a
    /// command: caller, name, args); empty for an observation.
    #[getter]
    fn args<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        match &self.call {
            HookCall::Message {
                kind,
                sender,
                to,
                text,
            } => (kind.name(), sender, to, text).into_pyobject(py),
            HookCall::Login {
                name,
                addr,
                registered,
            } => (name, addr.to_string(), registered).into_pyobject(py),
            HookCall::Upload {
                sender,
                target,
                filename,
                size,
            } => (sender, target, filename, size).into_pyobject(py),
            HookCall::Command { caller, name, args } => (caller, name, args).into_pyobject(py),
            HookCall::Observed { .. } => Ok(PyTuple::empty(py)),
        }
    }

    /// An observation's fields by name, `event` being its name (empty for a question,
    /// whose fields are `args`).
    #[getter]
    fn fields<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        if let HookCall::Observed { event, fields } = &self.call {
            d.set_item("event", event)?;
            for (key, value) in fields {
                d.set_item(key, value)?;
            }
        }
        Ok(d)
    }

    /// Lets it happen as asked.
    fn allow(&self) -> PyResult<()> {
        self.answer(Answer::Allow)
    }

    /// Refuses it: the user gets `ERROR: <reason>`.
    fn deny(&self, reason: String) -> PyResult<()> {
        self.answer(Answer::Deny(one_line(&reason)))
    }

    /// A message goes with `text` instead (one line).
    fn rewrite(&self, text: String) -> PyResult<()> {
        self.answer(Answer::Rewrite(text))
    }

    /// A command's answer: `lines` to its caller.
    fn reply(&self, lines: Vec<String>) -> PyResult<()> {
        self.answer(Answer::Reply(lines))
    }

    fn __repr__(&self) -> String {
        format!("HookRequest({:?})", self.call)
    }
}

/// Waits up to `limit` for the first pending request, then takes what else is waiting (at
/// most [`BATCH`] in all). `None`: the hooks are gone.
pub(super) async fn next_batch(
    rx: Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Pending>>>,
    limit: Duration,
) -> Option<Vec<Pending>> {
    // The limit covers the wait for the queue too: several threads take batches in turn.
    let deadline = tokio::time::Instant::now() + limit;
    let Ok(mut rx) = tokio::time::timeout_at(deadline, rx.lock()).await else {
        return Some(Vec::new());
    };
    let first = match tokio::time::timeout_at(deadline, rx.recv()).await {
        Ok(Some(first)) => first,
        Ok(None) => return None,
        Err(_) => return Some(Vec::new()),
    };
    let mut batch = vec![first];
    while batch.len() < BATCH {
        match rx.try_recv() {
            Ok(pending) => batch.push(pending),
            Err(_) => break,
        }
    }
    Some(batch)
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<HookRequest>()
}

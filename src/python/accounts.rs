//! `relaychat.AccountBook`: the operator's offline account management (`relaychat-server
//! accounts ...`), over the same store and rules as the server.

use std::path::PathBuf;
use std::sync::Arc;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use super::wait::block_on;
use crate::server::{add_account, set_account_password};
use crate::store::{SqliteStore, Store};

/// The accounts of one database, opened while no server uses it.
#[pyclass(module = "relaychat._native", name = "AccountBook", frozen)]
pub struct PyAccountBook {
    store: Arc<SqliteStore>,
}

fn refused(e: String) -> PyErr {
    PyValueError::new_err(e)
}

#[pymethods]
impl PyAccountBook {
    /// Opens the database at `db` (refused while a server uses it).
    #[new]
    fn new(py: Python<'_>, db: PathBuf) -> PyResult<Self> {
        let store = py
            .detach(|| SqliteStore::open(&db))
            .map_err(|e| crate::Error::Store(e.to_string()))?;
        Ok(Self {
            store: Arc::new(store),
        })
    }

    /// Registers `name` with `password`; returns the name as stored. Raises ValueError if
    /// the name or password breaks the rules or the name (or a look-alike) is taken.
    fn add(&self, py: Python<'_>, name: String, password: String) -> PyResult<String> {
        let store = self.store.clone();
        block_on(
            py,
            async move { add_account(&*store, &name, &password).await },
        )?
        .map_err(refused)
    }

    /// Sets `name`'s password; False if there is no such account.
    fn passwd(&self, py: Python<'_>, name: String, password: String) -> PyResult<bool> {
        let store = self.store.clone();
        block_on(py, async move {
            set_account_password(&*store, &name, &password).await
        })?
        .map_err(refused)
    }

    /// Deletes `name` with its group memberships and inbox; False if there was none.
    fn remove(&self, py: Python<'_>, name: String) -> PyResult<bool> {
        let store = self.store.clone();
        block_on(py, async move { store.remove_account(&name).await })?
            .map_err(|e| refused(e.to_string()))
    }

    /// Every account as `(name, created)`, created in UTC, ISO 8601.
    fn list(&self, py: Python<'_>) -> PyResult<Vec<(String, String)>> {
        let store = self.store.clone();
        let accounts = block_on(py, async move { store.accounts().await })?
            .map_err(|e| refused(e.to_string()))?;
        Ok(accounts
            .into_iter()
            .map(|a| (a.name, crate::protocol::server_line::utc(a.created)))
            .collect())
    }
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyAccountBook>()
}

//! A small pool of target connections. Why a pool: every chunk restore is one transaction, and
//! connecting (TLS, auth, session setup) per chunk would dominate small chunks; why a semaphore:
//! the target must never see more restore sessions than the operator allowed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use haul_core::pg::DbUrl;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::Client;

pub struct Pool {
    url: DbUrl,
    idle: Arc<Mutex<Vec<Client>>>,
    permits: Arc<Semaphore>,
}

/// A connection on loan; goes back to the pool on drop unless it is closed or may be inside a
/// transaction.
pub struct Pooled {
    client: Option<Client>,
    idle: Arc<Mutex<Vec<Client>>>,
    _permit: OwnedSemaphorePermit,
    /// Set while a transaction may be open on the connection. A restore whose RPC is dropped
    /// (its sender vanished) stops at whatever await it was in; its connection must not go
    /// back to the pool with that transaction open, or the next user would read its uncommitted
    /// ledger row as applied, or commit it along with its own chunk. Dropped while set, the
    /// connection is closed instead, and PostgreSQL rolls the transaction back.
    in_transaction: AtomicBool,
}

impl std::ops::Deref for Pooled {
    type Target = Client;
    fn deref(&self) -> &Client {
        self.client
            .as_ref()
            .expect("pooled client present until drop")
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            if !c.is_closed() && !self.in_transaction.load(Ordering::SeqCst) {
                if let Ok(mut idle) = self.idle.lock() {
                    idle.push(c);
                }
            }
        }
    }
}

impl Pooled {
    /// Throw the connection away instead of returning it (its session state is unknown).
    pub fn discard(mut self) {
        self.client.take();
    }

    /// Say whether a transaction may be open on the connection now (see `in_transaction`).
    pub fn set_in_transaction(&self, open: bool) {
        self.in_transaction.store(open, Ordering::SeqCst);
    }
}

impl Pool {
    pub fn new(url: DbUrl, size: usize) -> Pool {
        Pool {
            url,
            idle: Arc::new(Mutex::new(Vec::new())),
            permits: Arc::new(Semaphore::new(size.max(1))),
        }
    }

    pub async fn get(&self) -> anyhow::Result<Pooled> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| anyhow::anyhow!("target connection pool closed"))?;
        self.lend(permit).await
    }

    /// A connection if one is free now, else `None` (for work that has another way to go).
    pub async fn try_get(&self) -> anyhow::Result<Option<Pooled>> {
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => self.lend(permit).await.map(Some),
            Err(_) => Ok(None),
        }
    }

    async fn lend(&self, permit: OwnedSemaphorePermit) -> anyhow::Result<Pooled> {
        let reused = self.idle.lock().ok().and_then(|mut v| v.pop());
        let client = match reused {
            Some(c) if !c.is_closed() => c,
            _ => self.url.connect("haul-receiver").await?,
        };
        Ok(Pooled {
            client: Some(client),
            idle: self.idle.clone(),
            _permit: permit,
            in_transaction: AtomicBool::new(false),
        })
    }
}

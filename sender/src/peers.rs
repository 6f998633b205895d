//! gRPC clients to the coordinator and to receivers. A few HTTP/2 connections per receiver,
//! each reused by many streams: channels multiplex streams, and a fresh TLS handshake per chunk
//! would cost a round trip or two on a long link. Several connections because one TCP flow on
//! a long lossy path gets only about MSS / (RTT * sqrt(loss)), whatever the link could carry:
//! each chunk stream goes on the connection carrying the fewest streams (`stream_to`), so as
//! many streams as are in flight each get a flow of their own.

use std::collections::HashMap;
use std::sync::Arc;

use haul_certs::{Mtls, Role};
use haul_proto::coordinator_client::CoordinatorClient;
use haul_proto::receiver_client::ReceiverClient;
use tokio::sync::Mutex;
use tonic::transport::Channel;

pub struct Peers {
    tls: Mtls,
    coordinator: Channel,
    /// Receiver channels by advertised address and connection number, made on first use.
    receivers: Mutex<HashMap<(String, usize), Channel>>,
    /// Chunk streams open on each of them.
    streams: Arc<std::sync::Mutex<HashMap<(String, usize), usize>>>,
}

/// A chunk stream's place on one connection, given back when dropped.
pub struct StreamSlot {
    streams: Arc<std::sync::Mutex<HashMap<(String, usize), usize>>>,
    key: (String, usize),
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if let Ok(mut m) = self.streams.lock() {
            if let Some(n) = m.get_mut(&self.key) {
                *n = n.saturating_sub(1);
            }
        }
    }
}

impl Peers {
    pub fn new(tls: Mtls, coordinator_addr: &str) -> anyhow::Result<Peers> {
        let coordinator = haul_certs::connect_lazy(coordinator_addr, &tls, Role::Coordinator)?;
        Ok(Peers {
            tls,
            coordinator,
            receivers: Mutex::new(HashMap::new()),
            streams: Arc::default(),
        })
    }

    pub fn coordinator(&self) -> CoordinatorClient<Channel> {
        CoordinatorClient::new(self.coordinator.clone())
            .max_decoding_message_size(haul_core::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(haul_core::MAX_MESSAGE_BYTES)
    }

    /// The receiver at `addr`, on its first connection (control calls, schema, finalize).
    pub async fn receiver(&self, addr: &str) -> anyhow::Result<ReceiverClient<Channel>> {
        self.receiver_for(addr, 0).await
    }

    /// The receiver at `addr` for a chunk stream: on whichever of its first `connections`
    /// connections carries the fewest streams now (the lowest numbered of those), so streams in
    /// flight do not share a flow while another connection idles. The slot holds the place
    /// until the stream ends.
    pub async fn stream_to(
        &self,
        addr: &str,
        connections: usize,
    ) -> anyhow::Result<(ReceiverClient<Channel>, StreamSlot)> {
        let index = {
            let mut m = self
                .streams
                .lock()
                .map_err(|_| anyhow::anyhow!("stream counts poisoned"))?;
            let index = (0..connections.max(1))
                .min_by_key(|&i| (m.get(&(addr.to_string(), i)).copied().unwrap_or(0), i))
                .unwrap_or(0);
            *m.entry((addr.to_string(), index)).or_default() += 1;
            index
        };
        let slot = StreamSlot {
            streams: self.streams.clone(),
            key: (addr.to_string(), index),
        };
        Ok((self.receiver_for(addr, index).await?, slot))
    }

    /// The receiver at `addr` on connection `index` (a TCP connection of its own).
    pub async fn receiver_for(
        &self,
        addr: &str,
        index: usize,
    ) -> anyhow::Result<ReceiverClient<Channel>> {
        let mut map = self.receivers.lock().await;
        let key = (addr.to_string(), index);
        let channel = match map.get(&key) {
            Some(c) => c.clone(),
            None => {
                let c = haul_certs::connect_lazy(addr, &self.tls, Role::Receiver)?;
                map.insert(key, c.clone());
                c
            }
        };
        Ok(ReceiverClient::new(channel)
            .max_decoding_message_size(haul_core::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(haul_core::MAX_MESSAGE_BYTES))
    }
}

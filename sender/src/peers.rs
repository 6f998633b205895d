//! gRPC clients to the coordinator and to receivers. A few HTTP/2 connections per receiver,
//! each reused by many streams: channels multiplex streams, and a fresh TLS handshake per chunk
//! would cost a round trip or two on a long link. Several connections because one TCP flow on
//! a long lossy path gets only about MSS / (RTT * sqrt(loss)), whatever the link could carry:
//! chunk streams are spread over them (`receiver_for`).

use std::collections::HashMap;

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
}

impl Peers {
    pub fn new(tls: Mtls, coordinator_addr: &str) -> anyhow::Result<Peers> {
        let coordinator = haul_certs::connect_lazy(coordinator_addr, &tls, Role::Coordinator)?;
        Ok(Peers {
            tls,
            coordinator,
            receivers: Mutex::new(HashMap::new()),
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

//! gRPC clients to the coordinator and to receivers. One HTTP/2 connection per peer, reused by
//! every worker: channels multiplex streams, and a fresh TLS handshake per chunk would cost a
//! round trip or two on a long link.

use std::collections::HashMap;

use haul_certs::{Mtls, Role};
use haul_proto::coordinator_client::CoordinatorClient;
use haul_proto::receiver_client::ReceiverClient;
use tokio::sync::Mutex;
use tonic::transport::Channel;

pub struct Peers {
    tls: Mtls,
    coordinator: Channel,
    /// Receiver channels by advertised address, made on first use.
    receivers: Mutex<HashMap<String, Channel>>,
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

    pub async fn receiver(&self, addr: &str) -> anyhow::Result<ReceiverClient<Channel>> {
        let mut map = self.receivers.lock().await;
        let channel = match map.get(addr) {
            Some(c) => c.clone(),
            None => {
                let c = haul_certs::connect_lazy(addr, &self.tls, Role::Receiver)?;
                map.insert(addr.to_string(), c.clone());
                c
            }
        };
        Ok(ReceiverClient::new(channel)
            .max_decoding_message_size(haul_core::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(haul_core::MAX_MESSAGE_BYTES))
    }
}

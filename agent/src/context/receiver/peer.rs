//! The peer of a connection, and the process the kernel says it is.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{extract::connect_info::Connected as AxumConnected, serve::IncomingStream};
use tokio::{net::TcpListener, sync::OnceCell};

use crate::context::sender::{Binder, Sender};

/// The client end of one connection, and its sender once identified: cached
/// for the connection's life (a later connection from the same port may be
/// another process).
#[derive(Clone, Debug)]
pub(super) struct Peer {
    pub(super) remote: SocketAddr,
    pub(super) sender: Arc<OnceCell<Sender>>,
}

/// Waits before asking the kernel again about a peer it did not know: the
/// connection's first send may still be in its sender's hands (the probe
/// records it just after the data is queued).
pub(super) const IDENTIFY_RETRIES: [Duration; 3] = [
    Duration::from_millis(5),
    Duration::from_millis(20),
    Duration::from_millis(50),
];

impl Peer {
    pub(super) fn new(remote: SocketAddr) -> Self {
        Self {
            remote,
            sender: Arc::new(OnceCell::new()),
        }
    }

    /// Who sent this connection, as the kernel says (one map lookup).
    pub(super) async fn sender(&self, binder: &Binder) -> Sender {
        self.sender
            .get_or_init(|| async {
                let mut sender = binder.identify(self.remote);
                for wait in IDENTIFY_RETRIES {
                    if sender != Sender::Unidentified {
                        break;
                    }
                    tokio::time::sleep(wait).await;
                    sender = binder.identify(self.remote);
                }
                binder.count_connection(&sender);
                sender
            })
            .await
            .clone()
    }
}

impl AxumConnected<IncomingStream<'_, TcpListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Self {
        Peer::new(*stream.remote_addr())
    }
}

// Span mapping.

//! `lb-agent explain`: the agent gathers what the pure `core::explain`
//! needs (the service's live table, the flow's entry) and answers off its
//! loop, as a lookup may wait for a walk of the connection table.

use std::net::{IpAddr, SocketAddr};

use tokio::sync::oneshot;
use tracing::warn;

use super::Agent;
use crate::{
    config::Protocol,
    core::explain::{explain, select_service, FlowQuery, LiveTable},
    ports::{Dataplane, OrchestratorFactory, Prober},
    serve::api::Response,
};

impl<D: Dataplane, F: OrchestratorFactory, P: Prober> Agent<D, F, P> {
    pub(super) fn explain_flow(
        &self,
        service: &str,
        client: SocketAddr,
        protocol: Option<Protocol>,
        vip: Option<IpAddr>,
        reply: oneshot::Sender<Response>,
    ) {
        let config = match select_service(&self.config.services, service, protocol, vip) {
            Ok(c) => c,
            Err(e) => {
                let _ = reply.send(Response::error(e));
                return;
            }
        };
        let key = config.key();
        let Some((_, state)) = self.reconciler.services().find(|(k, _)| **k == key) else {
            let _ = reply.send(Response::error(format!("service {service:?} is not in the data plane yet")));
            return;
        };
        let vip = SocketAddr::new(config.vip, config.port);
        let query = FlowQuery { client, vip, proto: key.proto() };
        let Some(flow) = query.table_key() else {
            let _ = reply.send(Response::error(format!("client {client} and VIP {vip} are not of one family")));
            return;
        };
        let (name, half, slots, backends) =
            (config.name.clone(), state.table, state.live_table().to_vec(), state.backends.clone());
        let conns = self.dataplane.connection_table();
        tokio::task::spawn_blocking(move || {
            let seen = match conns.and_then(|c| c.lookup(&flow)) {
                Ok(seen) => seen,
                Err(e) => {
                    warn!(error = %e, "explain: reading the connection table failed");
                    let _ = reply.send(Response::error(format!("reading the connection table failed: {e}")));
                    return;
                }
            };
            let table = LiveTable { half, slots: &slots, backends: &backends };
            let _ = reply.send(Response::explain(explain(&name, &query, table, seen)));
        });
    }
}

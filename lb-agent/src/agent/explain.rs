//! `lb-agent explain`: the agent gathers what the pure `core::explain`
//! needs (the service's live table, the flow's entry) and answers off its
//! loop, as a lookup may wait for a walk of the connection table.

use std::net::{Ipv4Addr, SocketAddrV4};

use lb_common::FlowKey;
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
        client: SocketAddrV4,
        protocol: Option<Protocol>,
        vip: Option<Ipv4Addr>,
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
        let query = FlowQuery { client, vip: SocketAddrV4::new(config.vip, config.port), proto: key.proto };
        let (name, half, slots, backends) =
            (config.name.clone(), state.table, state.live_table().to_vec(), state.backends.clone());
        let conns = self.dataplane.connection_table();
        tokio::task::spawn_blocking(move || {
            let flow = FlowKey::new(
                u32::from(*client.ip()).to_be(),
                client.port().to_be(),
                key.vip_be,
                key.port_be,
                key.proto,
            );
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

//! `lb-agent explain`: the agent gathers what the pure `core::explain`
//! needs (the service's live table, the flow's entry) and answers off its
//! loop, as a lookup may wait for a walk of the connection table.

use std::net::{IpAddr, SocketAddr};

use lb_common::FlowKey;
use tokio::sync::oneshot;
use tracing::warn;

use super::Agent;
use crate::{
    config::Protocol,
    core::{
        explain::{explain, select_service, FlowQuery, LiveTable},
        vip::VipKey,
    },
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
        if client.is_ipv6() != vip.is_ipv6() {
            let _ = reply.send(Response::error(format!("client {client} and VIP {vip} are not of one family")));
            return;
        }
        let query = FlowQuery { client, vip, proto: key.proto() };
        let (name, half, slots, backends) =
            (config.name.clone(), state.table, state.live_table().to_vec(), state.backends.clone());
        let conns = self.dataplane.connection_table();
        tokio::task::spawn_blocking(move || {
            // The IPv6 connection table is not read here (yet): an IPv6
            // flow is explained by the Maglev table alone.
            let (VipKey::V4(k), SocketAddr::V4(c)) = (key, client) else {
                let table = LiveTable { half, slots: &slots, backends: &backends };
                let _ = reply.send(Response::explain(explain(&name, &query, table, None)));
                return;
            };
            let flow = FlowKey::new(u32::from(*c.ip()).to_be(), c.port().to_be(), k.vip_be, k.port_be, k.proto);
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

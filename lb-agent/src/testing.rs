//! A recording fake of the data plane, for the reconciler's unit tests.

use std::collections::BTreeMap;

use lb_common::{Backend, Service, ServiceKey, MAGLEV_TABLE_SIZE};

use crate::ports::{DataplaneError, MapWriter};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    Backend { id: u32, backend: Backend },
    Table { service_id: u32, table: u32, entries: usize },
    Service { key: ServiceKey, service: Service },
    RemoveService { key: ServiceKey },
}

impl Write {
    pub fn kind(&self) -> &'static str {
        match self {
            Write::Backend { .. } => "backend",
            Write::Table { .. } => "table",
            Write::Service { .. } => "service",
            Write::RemoveService { .. } => "remove_service",
        }
    }
}

/// Holds what the maps would hold, and the order things were written in.
#[derive(Debug, Default)]
pub struct FakeDataplane {
    pub log: Vec<Write>,
    pub backends: BTreeMap<u32, Backend>,
    pub tables: BTreeMap<(u32, u32), Vec<u32>>,
    pub services: BTreeMap<ServiceKey, Service>,
}

impl FakeDataplane {
    pub fn table(&self, service_id: u32, table: u32) -> Vec<u32> {
        self.tables.get(&(service_id, table)).cloned().unwrap_or_else(|| vec![0; MAGLEV_TABLE_SIZE as usize])
    }
}

impl MapWriter for FakeDataplane {
    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<(), DataplaneError> {
        self.backends.insert(id, *backend);
        self.log.push(Write::Backend { id, backend: *backend });
        Ok(())
    }

    fn set_table_entries(&mut self, service_id: u32, table: u32, entries: &[(u32, u32)]) -> Result<(), DataplaneError> {
        let mut t = self.table(service_id, table);
        for (slot, id) in entries {
            t[*slot as usize] = *id;
        }
        self.tables.insert((service_id, table), t);
        self.log.push(Write::Table { service_id, table, entries: entries.len() });
        Ok(())
    }

    fn set_service(&mut self, key: &ServiceKey, service: &Service) -> Result<(), DataplaneError> {
        self.services.insert(*key, *service);
        self.log.push(Write::Service { key: *key, service: *service });
        Ok(())
    }

    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), DataplaneError> {
        self.services.remove(key);
        self.log.push(Write::RemoveService { key: *key });
        Ok(())
    }
}

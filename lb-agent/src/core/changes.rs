//! What a reload changed, per service: backends added, removed (drained),
//! reweighted, the Maglev slots that moved, and the run-time changes it
//! kept or dropped. One summary, for the log, the events and the reply of
//! `lb-agent reload`. Pure.

use std::{collections::BTreeMap, fmt, net::SocketAddr};

use crate::{
    config::{Config, ServiceConfig},
    core::overlay::{Dropped, Entry},
};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceChanges {
    pub name: String,
    /// The service is new; `removed_service`: it is gone.
    pub new_service: bool,
    pub removed_service: bool,
    pub added: Vec<(SocketAddr, u32)>,
    pub removed: Vec<SocketAddr>,
    /// (address, weight before, weight now).
    pub reweighted: Vec<(SocketAddr, u32, u32)>,
    /// Slots of the live Maglev table that now name another backend.
    pub slots_moved: usize,
    /// Run-time changes the reload dropped (see `core::overlay`).
    pub dropped: Vec<(Entry, Dropped)>,
}

impl ServiceChanges {
    fn is_empty(&self) -> bool {
        !self.new_service
            && !self.removed_service
            && self.added.is_empty()
            && self.removed.is_empty()
            && self.reweighted.is_empty()
            && self.slots_moved == 0
            && self.dropped.is_empty()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReloadChanges {
    /// Only the services something happened to.
    pub services: Vec<ServiceChanges>,
    /// Run-time changes still laid over the file.
    pub overlay_kept: usize,
}

/// Compare the effective configs before and after (`core::overlay`), with
/// the slots each service's table moved and what the overlay dropped.
pub fn summarize(
    old: &Config,
    new: &Config,
    slots_moved: &BTreeMap<String, usize>,
    dropped: &[(Entry, Dropped)],
    overlay_kept: usize,
) -> ReloadChanges {
    let find = |c: &Config, name: &str| c.services.iter().find(|s| s.name == name).cloned();
    let mut names: Vec<&String> = old.services.iter().chain(&new.services).map(|s| &s.name).collect();
    names.sort();
    names.dedup();
    let mut services = Vec::new();
    for name in names {
        let (before, after) = (find(old, name), find(new, name));
        let mut c = ServiceChanges {
            name: name.clone(),
            new_service: before.is_none(),
            removed_service: after.is_none(),
            slots_moved: slots_moved.get(name).copied().unwrap_or(0),
            dropped: dropped.iter().filter(|(e, _)| &e.service == name).cloned().collect(),
            ..ServiceChanges::default()
        };
        if let (Some(b), Some(a)) = (&before, &after) {
            diff_backends(b, a, &mut c);
        } else if let Some(a) = &after {
            c.added = a.backends.iter().map(|b| (b.address, b.weight)).collect();
        }
        if !c.is_empty() {
            services.push(c);
        }
    }
    ReloadChanges { services, overlay_kept }
}

fn diff_backends(before: &ServiceConfig, after: &ServiceConfig, c: &mut ServiceChanges) {
    let weights =
        |s: &ServiceConfig| -> BTreeMap<SocketAddr, u32> { s.backends.iter().map(|b| (b.address, b.weight)).collect() };
    let (b, a) = (weights(before), weights(after));
    for (addr, w) in &a {
        match b.get(addr) {
            None => c.added.push((*addr, *w)),
            Some(was) if was != w => c.reweighted.push((*addr, *was, *w)),
            Some(_) => {}
        }
    }
    c.removed = b.keys().filter(|addr| !a.contains_key(addr)).copied().collect();
}

impl fmt::Display for ServiceChanges {
    /// "web: added 10.1.0.4:80 (weight 1), reweighted 10.1.0.1:80 1 -> 3,
    /// 1024 slot(s) moved".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if self.removed_service {
            parts.push("removed".to_owned());
        } else if self.new_service {
            parts.push(format!("new, {} backend(s)", self.added.len()));
        } else {
            parts.extend(self.added.iter().map(|(a, w)| format!("added {a} (weight {w})")));
            parts.extend(self.removed.iter().map(|a| format!("removed {a} (draining)")));
            parts.extend(self.reweighted.iter().map(|(a, was, w)| format!("reweighted {a} {was} -> {w}")));
        }
        if !self.removed_service {
            parts.push(format!("{} slot(s) moved", self.slots_moved));
        }
        for (why, says) in [
            (Dropped::ServiceGone, "dropped with it"),
            (Dropped::FileAgrees, "dropped: the file now says the same"),
            (Dropped::NotInFile, "dropped: the file no longer lists their backend"),
        ] {
            let n = self.dropped.iter().filter(|(_, d)| *d == why).count();
            if n > 0 {
                parts.push(format!("{n} run-time change(s) {says}"));
            }
        }
        write!(f, "{}: {}", self.name, parts.join(", "))
    }
}

impl fmt::Display for ReloadChanges {
    /// Each service's changes, "; "-separated (or "no backend changed"),
    /// then the run-time changes kept.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.services.is_empty() {
            f.write_str("no backend changed")?;
        }
        for (i, s) in self.services.iter().enumerate() {
            write!(f, "{}{s}", if i > 0 { "; " } else { "" })?;
        }
        write_kept(f, self.overlay_kept)
    }
}

/// "; 2 run-time change(s) kept, see `lb-agent config dump`" when any are.
pub fn write_kept(f: &mut impl fmt::Write, kept: usize) -> fmt::Result {
    if kept > 0 {
        write!(f, "; {kept} run-time change(s) kept, see `lb-agent config dump`")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{core::overlay::Overlay, testing::web_and_api_config};

    fn file(web: &[(&str, u32)], api: bool) -> Config {
        web_and_api_config(web, api.then_some(&["10.2.0.1:80"]))
    }

    #[test]
    fn each_service_says_what_was_added_removed_and_reweighted() {
        let old = file(&[("10.1.0.1:80", 1), ("10.1.0.2:80", 1)], true);
        let new = file(&[("10.1.0.1:80", 3), ("10.1.0.4:80", 1)], false);
        let moved = BTreeMap::from([("web".to_owned(), 4242)]);
        let mut o = Overlay::default();
        o.add(&old, "api", "10.2.0.9:80".parse().unwrap(), 2);
        let (kept, dropped) = o.rebase(&new);
        let c = summarize(&old, &new, &moved, &dropped, kept.len());
        assert_eq!(
            c.to_string(),
            "api: removed, 1 run-time change(s) dropped with it; web: added 10.1.0.4:80 (weight 1), removed \
             10.1.0.2:80 (draining), reweighted 10.1.0.1:80 1 -> 3, 4242 slot(s) moved"
        );
        let back = summarize(&new, &old, &BTreeMap::new(), &[], 0);
        assert_eq!(back.services[0].to_string(), "api: new, 1 backend(s), 0 slot(s) moved");
    }

    #[test]
    fn an_unrelated_edit_changes_nothing_and_names_the_changes_kept() {
        let f = file(&[("10.1.0.1:80", 1)], false);
        let c = summarize(&f, &f, &BTreeMap::new(), &[], 2);
        assert!(c.services.is_empty());
        assert_eq!(c.to_string(), "no backend changed; 2 run-time change(s) kept, see `lb-agent config dump`");
    }
}

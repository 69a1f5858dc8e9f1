//! Run-time changes as an overlay on the config file. Pure.
//!
//! `lb-agent backend add/remove/weight` change the running agent at once,
//! and are kept as an overlay that every reload (the file changed, SIGHUP,
//! `lb-agent reload`) lays over the file again, until `lb-agent backend
//! reset` drops them. The rule for what the file says later:
//! - a change the file now agrees with (the same weight, a removed backend
//!   the file no longer lists) is redundant, and dropped;
//! - a weight change to a backend the file no longer lists is dropped with
//!   it (a backend added at run time stays, whatever the file says);
//! - a service the file no longer has takes its changes with it;
//! - anything else the file says about the service still applies: only
//!   the backends the overlay names are overlaid.
//!
//! The overlay lives in the agent's memory: a restarted agent starts from
//! the file.

use std::{collections::BTreeMap, fmt, net::SocketAddr, path::Path};

use anyhow::Context as _;
use toml_edit::{value, ArrayOfTables, DocumentMut, Item, Table};

use crate::config::{BackendConfig, Config, ServiceConfig};

/// What the overlay says of one backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// A backend of the file, with another weight.
    Weight(u32),
    /// Added at run time, with this weight.
    Added(u32),
    /// Removed (drained), though the file lists it.
    Removed,
}

/// One backend's run-time change, next to what the file says of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub service: String,
    pub addr: SocketAddr,
    pub change: Change,
    /// The backend's weight in the file; `None`: the file does not list it.
    pub file_weight: Option<u32>,
}

impl fmt::Display for Entry {
    /// "weight 3, file says 1", "added with weight 2, not in the file",
    /// "removed, file says weight 1".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.change, self.file_weight) {
            (Change::Weight(w) | Change::Added(w), Some(was)) => write!(f, "weight {w}, file says {was}"),
            (Change::Weight(w), None) => write!(f, "weight {w}, not in the file"),
            (Change::Added(w), None) => write!(f, "added with weight {w}, not in the file"),
            (Change::Removed, Some(was)) => write!(f, "removed, file says weight {was}"),
            (Change::Removed, None) => write!(f, "removed"),
        }
    }
}

/// Why a reload dropped a change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    /// The file now says the same.
    FileAgrees,
    /// A weight change to a backend the file no longer lists.
    NotInFile,
    /// The file no longer has the service.
    ServiceGone,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overlay {
    changes: BTreeMap<String, BTreeMap<SocketAddr, Change>>,
}

impl Overlay {
    /// `backend add`: a backend of the file (removed at run time before)
    /// is only reweighted.
    pub fn add(&mut self, file: &Config, service: &str, addr: SocketAddr, weight: u32) {
        let listed = find(file, service).and_then(|s| file_weight(s, addr)).is_some();
        self.record(file, service, addr, if listed { Change::Weight(weight) } else { Change::Added(weight) });
    }

    /// `backend weight`: one added at run time stays added; one removed
    /// stays removed (it drains with its new weight).
    pub fn reweight(&mut self, file: &Config, service: &str, addr: SocketAddr, weight: u32) {
        match self.get(service, addr) {
            Some(Change::Removed) => {}
            Some(Change::Added(_)) => self.record(file, service, addr, Change::Added(weight)),
            _ => self.record(file, service, addr, Change::Weight(weight)),
        }
    }

    /// `backend remove`.
    pub fn remove(&mut self, file: &Config, service: &str, addr: SocketAddr) {
        self.record(file, service, addr, Change::Removed);
    }

    /// Record a run-time change made to a service of `file`; one the file
    /// already agrees with leaves no entry.
    pub fn record(&mut self, file: &Config, service: &str, addr: SocketAddr, change: Change) {
        let svc = find(file, service);
        let changes = self.changes.entry(service.to_owned()).or_default();
        if redundant(svc, addr, change) {
            changes.remove(&addr);
        } else {
            changes.insert(addr, change);
        }
        self.changes.retain(|_, c| !c.is_empty());
    }

    /// Drop the service's changes (or only `addr`'s); returns how many.
    pub fn reset(&mut self, service: &str, addr: Option<SocketAddr>) -> usize {
        let Some(changes) = self.changes.get_mut(service) else { return 0 };
        let before = changes.len();
        match addr {
            Some(a) => {
                changes.remove(&a);
            }
            None => changes.clear(),
        }
        let dropped = before - changes.len();
        self.changes.retain(|_, c| !c.is_empty());
        dropped
    }

    /// The overlay on a newly read `file`, and the changes it drops.
    pub fn rebase(&self, file: &Config) -> (Overlay, Vec<(Entry, Dropped)>) {
        let mut kept = Overlay::default();
        let mut dropped = Vec::new();
        for (service, changes) in &self.changes {
            let svc = find(file, service);
            for (addr, change) in changes {
                let entry = || Entry {
                    service: service.clone(),
                    addr: *addr,
                    change: *change,
                    file_weight: svc.and_then(|s| file_weight(s, *addr)),
                };
                let unlisted = svc.is_some_and(|s| file_weight(s, *addr).is_none());
                match svc {
                    None => dropped.push((entry(), Dropped::ServiceGone)),
                    Some(_) if matches!(change, Change::Weight(_)) && unlisted => {
                        dropped.push((entry(), Dropped::NotInFile))
                    }
                    Some(_) if redundant(svc, *addr, *change) => dropped.push((entry(), Dropped::FileAgrees)),
                    Some(_) => {
                        kept.changes.entry(service.clone()).or_default().insert(*addr, *change);
                    }
                }
            }
        }
        (kept, dropped)
    }

    /// The effective config: `file` with the overlay laid over it. Added
    /// backends come after the file's own.
    pub fn apply(&self, file: &Config) -> Config {
        let mut out = file.clone();
        for svc in &mut out.services {
            let Some(changes) = self.changes.get(&svc.name) else { continue };
            for (addr, change) in changes {
                let listed = svc.backends.iter().position(|b| b.address == *addr);
                match (change, listed) {
                    (Change::Weight(w) | Change::Added(w), Some(i)) => svc.backends[i].weight = *w,
                    (Change::Added(w), None) => svc.backends.push(BackendConfig { address: *addr, weight: *w }),
                    (Change::Removed, Some(i)) => {
                        svc.backends.remove(i);
                    }
                    (Change::Weight(_) | Change::Removed, None) => {}
                }
            }
        }
        out
    }

    /// Every change, with what `file` says of its backend.
    pub fn entries(&self, file: &Config) -> Vec<Entry> {
        let mut out = Vec::new();
        for (service, changes) in &self.changes {
            let svc = find(file, service);
            for (addr, change) in changes {
                let file_weight = svc.and_then(|s| file_weight(s, *addr));
                out.push(Entry { service: service.clone(), addr: *addr, change: *change, file_weight });
            }
        }
        out
    }

    /// The change `service`'s `addr` has, if any.
    pub fn get(&self, service: &str, addr: SocketAddr) -> Option<Change> {
        self.changes.get(service)?.get(&addr).copied()
    }

    pub fn len(&self) -> usize {
        self.changes.values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// The effective config as TOML: `text` (the file at `path`, which
    /// parses to `file`) with the overlay edited in, each line it changed
    /// commented `# run-time: ...`, and each removed backend named above its
    /// service. What comes out is checked to parse to `self.apply(file)`.
    pub fn dump(&self, text: &str, file: &Config, path: &Path) -> anyhow::Result<String> {
        let now = Config::parse(text, path)?;
        anyhow::ensure!(
            &now == file,
            "{} changed since the agent last applied it: run `lb-agent reload` (if it is refused, `lb-agent status` says why)",
            path.display()
        );
        let mut doc: DocumentMut = text.parse().with_context(|| format!("parse {}", path.display()))?;
        let entries = self.entries(file);
        if let Some(services) = doc.get_mut("service").and_then(Item::as_array_of_tables_mut) {
            for svc in services.iter_mut() {
                let name = svc.get("name").and_then(Item::as_str).unwrap_or_default().to_owned();
                let mine: Vec<&Entry> = entries.iter().filter(|e| e.service == name).collect();
                if !mine.is_empty() {
                    edit_service(svc, &name, &mine)?;
                }
            }
        }
        let header = match entries.len() {
            0 => format!("# lb-agent config dump: {}, no run-time changes\n", path.display()),
            n => format!(
                "# lb-agent config dump: {} with {n} run-time change(s) from `lb-agent backend`;\n\
                 # `lb-agent backend reset <service>` drops them.\n",
                path.display()
            ),
        };
        let out = header + &doc.to_string();
        let parsed = Config::parse(&out, path).context("the dump does not parse back (a bug)")?;
        anyhow::ensure!(parsed == self.apply(file), "the dump does not parse back to the running config (a bug)");
        Ok(out)
    }
}

/// Edit one `[[service]]` table's backends: `entries` are its changes.
fn edit_service(svc: &mut Table, name: &str, entries: &[&Entry]) -> anyhow::Result<()> {
    let mut removed_notes = String::new();
    let backends = svc.entry("backend").or_insert(Item::ArrayOfTables(ArrayOfTables::new()));
    let backends = backends.as_array_of_tables_mut().with_context(|| {
        format!("service {name:?}: its backends are not written as [[service.backend]] tables; cannot dump them")
    })?;
    let address_of = |t: &Table| t.get("address").and_then(Item::as_str).and_then(|a| a.parse::<SocketAddr>().ok());
    for e in entries {
        let note = format!(" # run-time: {e}");
        let at = backends.iter().position(|t| address_of(t) == Some(e.addr));
        match (e.change, at) {
            (Change::Weight(w) | Change::Added(w), Some(i)) => {
                let Some(t) = backends.get_mut(i) else { continue };
                t["weight"] = value(i64::from(w));
                set_note(&mut t["weight"], &note);
            }
            (Change::Added(w), None) => {
                let mut t = Table::new();
                t["address"] = value(e.addr.to_string());
                t["weight"] = value(i64::from(w));
                set_note(&mut t["address"], &note);
                backends.push(t);
            }
            (Change::Removed, Some(i)) => {
                backends.remove(i);
                removed_notes += &format!("# run-time: backend {} {e}\n", e.addr);
            }
            (Change::Weight(_) | Change::Removed, None) => {}
        }
    }
    if !removed_notes.is_empty() {
        let prefix = svc.decor().prefix().and_then(|p| p.as_str()).unwrap_or_default().to_owned();
        svc.decor_mut().set_prefix(prefix + &removed_notes);
    }
    Ok(())
}

fn set_note(item: &mut Item, note: &str) {
    if let Some(v) = item.as_value_mut() {
        v.decor_mut().set_suffix(note);
    }
}

fn find<'c>(file: &'c Config, service: &str) -> Option<&'c ServiceConfig> {
    file.services.iter().find(|s| s.name == service)
}

fn file_weight(svc: &ServiceConfig, addr: SocketAddr) -> Option<u32> {
    svc.backends.iter().find(|b| b.address == addr).map(|b| b.weight)
}

/// Whether the file (its service `svc`) already says what `change` does.
fn redundant(svc: Option<&ServiceConfig>, addr: SocketAddr, change: Change) -> bool {
    let listed = svc.and_then(|s| file_weight(s, addr));
    match change {
        Change::Weight(w) => listed.is_none_or(|l| l == w),
        Change::Added(w) => listed == Some(w),
        Change::Removed => listed.is_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::web_and_api_config;

    fn file(backends: &[(&str, u32)], api: bool) -> Config {
        web_and_api_config(backends, api.then_some(&[]))
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// 10.1.0.1:80 at weight 3, 10.1.0.2:80 removed.
    fn reweighted_and_removed(f: &Config) -> Overlay {
        let mut o = Overlay::default();
        o.reweight(f, "web", addr("10.1.0.1:80"), 3);
        o.remove(f, "web", addr("10.1.0.2:80"));
        o
    }

    fn weights(c: &Config) -> Vec<(String, u32)> {
        c.services[0].backends.iter().map(|b| (b.address.to_string(), b.weight)).collect()
    }

    #[test]
    fn apply_lays_weights_additions_and_removals_over_the_file() {
        let f = file(&[("10.1.0.1:80", 1), ("10.1.0.2:80", 1), ("10.1.0.3:80", 2)], false);
        let mut o = reweighted_and_removed(&f);
        o.add(&f, "web", addr("10.1.0.9:80"), 2);
        assert_eq!(o.len(), 3);
        assert_eq!(
            weights(&o.apply(&f)),
            [("10.1.0.1:80".into(), 3), ("10.1.0.3:80".into(), 2), ("10.1.0.9:80".into(), 2)]
        );
        let notes: Vec<String> = o.entries(&f).iter().map(|e| format!("{} {}: {e}", e.service, e.addr)).collect();
        assert_eq!(
            notes,
            [
                "web 10.1.0.1:80: weight 3, file says 1",
                "web 10.1.0.2:80: removed, file says weight 1",
                "web 10.1.0.9:80: added with weight 2, not in the file",
            ]
        );
    }

    #[test]
    fn a_change_back_to_what_the_file_says_leaves_no_entry() {
        let f = file(&[("10.1.0.1:80", 1)], false);
        let mut o = Overlay::default();
        o.record(&f, "web", addr("10.1.0.1:80"), Change::Weight(3));
        o.record(&f, "web", addr("10.1.0.1:80"), Change::Weight(1));
        assert!(o.is_empty());
        // Added at run time, then removed: nothing left to say.
        o.add(&f, "web", addr("10.1.0.9:80"), 1);
        o.reweight(&f, "web", addr("10.1.0.9:80"), 4);
        assert_eq!(o.get("web", addr("10.1.0.9:80")), Some(Change::Added(4)));
        o.remove(&f, "web", addr("10.1.0.9:80"));
        assert!(o.is_empty());
        // Reweighting a removed backend leaves it removed (it drains).
        o.remove(&f, "web", addr("10.1.0.1:80"));
        o.reweight(&f, "web", addr("10.1.0.1:80"), 5);
        assert_eq!(o.get("web", addr("10.1.0.1:80")), Some(Change::Removed));
        // Added back: the file's backend again.
        o.add(&f, "web", addr("10.1.0.1:80"), 1);
        assert!(o.is_empty());
    }

    #[test]
    fn a_reload_keeps_changes_the_file_does_not_agree_with() {
        let f = file(&[("10.1.0.1:80", 1), ("10.1.0.2:80", 1), ("10.1.0.3:80", 1)], true);
        let mut o = reweighted_and_removed(&f);
        o.add(&f, "api", addr("10.2.0.1:80"), 1);
        o.record(&f, "web", addr("10.1.0.3:80"), Change::Weight(2));
        // An unrelated edit (another backend) keeps all four.
        let edited = file(&[("10.1.0.1:80", 1), ("10.1.0.2:80", 1), ("10.1.0.3:80", 1), ("10.1.0.4:80", 1)], true);
        let (kept, dropped) = o.rebase(&edited);
        assert_eq!((kept.len(), dropped.len()), (4, 0));
        assert_eq!(kept.get("web", addr("10.1.0.1:80")), Some(Change::Weight(3)));
        // The file now says weight 3, drops 10.1.0.2 and 10.1.0.3, and api
        // is gone.
        let agrees = file(&[("10.1.0.1:80", 3)], false);
        let (kept, dropped) = o.rebase(&agrees);
        assert!(kept.is_empty(), "{kept:?}");
        let why: Vec<(String, Dropped)> =
            dropped.iter().map(|(e, d)| (format!("{} {}", e.service, e.addr), *d)).collect();
        assert_eq!(
            why,
            [
                ("api 10.2.0.1:80".into(), Dropped::ServiceGone),
                ("web 10.1.0.1:80".into(), Dropped::FileAgrees),
                ("web 10.1.0.2:80".into(), Dropped::FileAgrees),
                ("web 10.1.0.3:80".into(), Dropped::NotInFile),
            ]
        );
    }

    #[test]
    fn reset_drops_one_backend_or_the_whole_service() {
        let f = file(&[("10.1.0.1:80", 1), ("10.1.0.2:80", 1)], true);
        let mut o = Overlay::default();
        o.record(&f, "web", addr("10.1.0.1:80"), Change::Weight(3));
        o.record(&f, "web", addr("10.1.0.2:80"), Change::Weight(4));
        o.add(&f, "api", addr("10.2.0.1:80"), 1);
        assert_eq!(o.reset("web", Some(addr("10.1.0.9:80"))), 0);
        assert_eq!(o.reset("web", Some(addr("10.1.0.1:80"))), 1);
        assert_eq!(o.get("web", addr("10.1.0.1:80")), None);
        assert_eq!(o.reset("web", None), 1);
        assert_eq!(o.reset("nope", None), 0);
        assert_eq!(o.len(), 1);
        assert_eq!(weights(&o.apply(&f)), [("10.1.0.1:80".into(), 1), ("10.1.0.2:80".into(), 1)]);
    }

    #[test]
    fn dump_edits_the_files_own_text_and_parses_back_to_the_effective_config() {
        let text = "# my load balancer\n\
            [[service]]\nname = \"web\"\nvip = \"10.0.0.100\"\nport = 80\ninterfaces = [\"eth0\"]\n\
            [[service.backend]]\naddress = \"10.1.0.1:80\"\n\
            [[service.backend]]\naddress = \"10.1.0.2:80\" # the old one\nweight = 2\n\n\
            [[service]]\nname = \"api\"\nvip = \"10.0.0.101\"\nport = 80\ninterfaces = [\"eth0\"]\n\
            [[service.backend]]\naddress = \"10.2.0.1:80\"\n";
        let path = Path::new("lb.toml");
        let f = Config::parse(text, path).unwrap();
        let mut o = reweighted_and_removed(&f);
        o.add(&f, "web", addr("10.1.0.9:80"), 1);
        o.add(&f, "api", addr("10.2.0.1:80"), 0);
        let out = o.dump(text, &f, path).unwrap();
        for line in [
            "# lb-agent config dump: lb.toml with 4 run-time change(s) from `lb-agent backend`;",
            "# my load balancer",
            "# run-time: backend 10.1.0.2:80 removed, file says weight 2\n[[service]]\nname = \"web\"",
            "weight = 3 # run-time: weight 3, file says 1\n",
            "address = \"10.1.0.9:80\" # run-time: added with weight 1, not in the file\nweight = 1\n",
            "weight = 0 # run-time: weight 0, file says 1\n",
        ] {
            assert!(out.contains(line), "{line:?} not in:\n{out}");
        }
        // Each added backend stays with its own service.
        assert_eq!(Config::parse(&out, path).unwrap(), o.apply(&f));
        // No changes: the file as it is, said so.
        let plain = Overlay::default().dump(text, &f, path).unwrap();
        assert_eq!(plain, format!("# lb-agent config dump: lb.toml, no run-time changes\n{text}"));
        // A file edited since it was applied is not passed off as running.
        let e = o.dump(&text.replace("weight = 2", "weight = 5"), &f, path).unwrap_err();
        assert!(format!("{e:#}").contains("lb.toml changed since the agent last applied it"), "{e:#}");
    }
}

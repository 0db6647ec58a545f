//! The runs the daemon watches, found by what an event names.
//!
//! An exit record's inotify event names a file, `UnitRemoved` names a scope: each finds its
//! run in one lookup here. (Found by scanning every live run, each event cost ~10,000
//! path builds at 10,000 live — as much as the rest of a death's booking.)

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};

use super::{Live, RunKey};
use crate::names;

#[derive(Default)]
pub(super) struct LiveRuns {
    /// Ordered, so a task's runs are one range (`runs_of`), never a scan of every live run.
    runs: BTreeMap<RunKey, Live>,
    by_unit: HashMap<String, RunKey>,
    /// By the exit record's file name (`names::run_record`).
    by_record: HashMap<OsString, RunKey>,
}

fn record_name(key: &RunKey) -> OsString {
    names::run_record(&key.board, &key.task, key.run).into()
}

impl LiveRuns {
    pub(super) fn insert(&mut self, key: RunKey, live: Live) {
        if let Some(old) = self.runs.get(&key) {
            self.by_unit.remove(&old.unit);
        }
        self.by_unit.insert(live.unit.clone(), key.clone());
        self.by_record.insert(record_name(&key), key.clone());
        self.runs.insert(key, live);
    }

    pub(super) fn remove(&mut self, key: &RunKey) -> Option<Live> {
        let live = self.runs.remove(key)?;
        self.by_unit.remove(&live.unit);
        self.by_record.remove(&record_name(key));
        Some(live)
    }

    /// A live run's entry to change; its `unit` is what it was inserted with, and stays so.
    pub(super) fn get_mut(&mut self, key: &RunKey) -> Option<&mut Live> {
        self.runs.get_mut(key)
    }

    pub(super) fn of_unit(&self, unit: &str) -> Option<&RunKey> {
        self.by_unit.get(unit)
    }

    /// The run whose exit record is the file `name` (in the state directory's `runs/`).
    pub(super) fn of_record(&self, name: &OsStr) -> Option<&RunKey> {
        self.by_record.get(name)
    }
}

impl std::ops::Deref for LiveRuns {
    type Target = BTreeMap<RunKey, Live>;

    fn deref(&self) -> &Self::Target {
        &self.runs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(unit: &str) -> Live {
        Live {
            unit: unit.into(),
            lock: String::new(),
            max_runtime: None,
            closed_since: None,
            watched: true,
            stale: None,
            board_full: false,
            profile: "default".into(),
            spawned: None,
        }
    }

    #[test]
    fn a_run_is_found_by_its_scope_and_its_record_until_it_is_removed() {
        let mut l = LiveRuns::default();
        let a = RunKey::new("default", "t_1", 1);
        let b = RunKey::new("other", "t_1", 1);
        l.insert(a.clone(), live("a.scope"));
        l.insert(b.clone(), live("b.scope"));
        assert_eq!(l.of_unit("a.scope"), Some(&a));
        assert_eq!(l.of_record(&record_name(&b)), Some(&b));
        // Inserted again under another scope (adopted after a restart): the old name goes.
        l.insert(a.clone(), live("a2.scope"));
        assert_eq!(l.of_unit("a.scope"), None);
        assert_eq!(l.of_unit("a2.scope"), Some(&a));
        assert!(l.remove(&a).is_some());
        assert_eq!(l.of_unit("a2.scope"), None);
        assert_eq!(l.of_record(&record_name(&a)), None);
        assert_eq!(l.of_record(&record_name(&b)), Some(&b));
        assert_eq!(l.len(), 1);
    }
}

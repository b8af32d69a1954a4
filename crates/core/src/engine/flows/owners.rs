//! Which engine holds each flow, when several engines serve one guest (`engine::shard`):
//! every engine's flow table keeps it up to date as flows come and go, and an engine that
//! gets a frame of a flow it does not hold looks here for the one that does.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use super::FlowKey;

#[derive(Default)]
pub struct Owners(Mutex<HashMap<FlowKey, usize>>);

impl Owners {
    fn map(&self) -> MutexGuard<'_, HashMap<FlowKey, usize>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The engine that holds the flow `key`, if any does.
    pub fn owner(&self, key: &FlowKey) -> Option<usize> {
        self.map().get(key).copied()
    }

    /// Engine `me` holds the flow `key` from now on.
    pub fn claim(&self, key: FlowKey, me: usize) {
        self.map().insert(key, me);
    }

    /// Engine `me` holds the flow `key` from now on, if no engine does yet: whether it took
    /// it (one step, so two engines never both take a free key).
    pub fn claim_vacant(&self, key: FlowKey, me: usize) -> bool {
        match self.map().entry(key) {
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(me);
                true
            }
            std::collections::hash_map::Entry::Occupied(_) => false,
        }
    }

    /// Engine `me` no longer holds the flow `key` (another engine's claim stays).
    pub fn release(&self, key: &FlowKey, me: usize) {
        let mut map = self.map();
        if map.get(key) == Some(&me) {
            map.remove(key);
        }
    }
}

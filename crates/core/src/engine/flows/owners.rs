//! Which engine holds each flow, when several engines serve one guest (`engine::shard`):
//! every engine's flow table keeps it up to date as flows come and go, and an engine that
//! gets a frame of a flow it does not hold looks here for the one that does. It also counts
//! the TCP flows each engine holds, so that a new connection can go to the engine with the
//! fewest (`Engine::keep_frame`). Spliced connections of published ports count with them:
//! they never cross the guest's link, so they have no key here, but they are TCP work of
//! engine 0's all the same.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use super::FlowKey;

#[derive(Default)]
pub struct Owners(Mutex<Map>);

#[derive(Default)]
struct Map {
    owner: HashMap<FlowKey, usize>,
    /// TCP keys in `owner` and spliced connections, per engine (grown as engines claim).
    tcp: Vec<usize>,
}

impl Map {
    fn count(&mut self, key: &FlowKey, engine: usize, add: bool) {
        if matches!(key, FlowKey::Tcp { .. }) {
            self.count_tcp(engine, add);
        }
    }

    fn count_tcp(&mut self, engine: usize, add: bool) {
        if self.tcp.len() <= engine {
            self.tcp.resize(engine + 1, 0);
        }
        let n = &mut self.tcp[engine];
        *n = if add { *n + 1 } else { n.saturating_sub(1) };
    }
}

impl Owners {
    fn map(&self) -> MutexGuard<'_, Map> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The engine that holds the flow `key`, if any does.
    pub fn owner(&self, key: &FlowKey) -> Option<usize> {
        self.map().owner.get(key).copied()
    }

    /// Engine `me` holds the flow `key` from now on.
    pub fn claim(&self, key: FlowKey, me: usize) {
        let mut map = self.map();
        match map.owner.insert(key, me) {
            Some(old) if old == me => {}
            Some(old) => {
                map.count(&key, old, false);
                map.count(&key, me, true);
            }
            None => map.count(&key, me, true),
        }
    }

    /// Engine `me` holds the flow `key` from now on, if no engine does yet: whether it took
    /// it (one step, so two engines never both take a free key).
    pub fn claim_vacant(&self, key: FlowKey, me: usize) -> bool {
        let mut map = self.map();
        match map.owner.entry(key) {
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(me);
                map.count(&key, me, true);
                true
            }
            std::collections::hash_map::Entry::Occupied(_) => false,
        }
    }

    /// Engine `me` no longer holds the flow `key` (another engine's claim stays).
    pub fn release(&self, key: &FlowKey, me: usize) {
        let mut map = self.map();
        if map.owner.get(key) == Some(&me) {
            map.owner.remove(key);
            map.count(key, me, false);
        }
    }

    /// Engine `me` holds one spliced connection more (`add`) or one less.
    pub fn count_splice(&self, me: usize, add: bool) {
        self.map().count_tcp(me, add);
    }

    /// The TCP flows engine `engine` holds.
    #[cfg(test)]
    pub fn tcp_flows(&self, engine: usize) -> usize {
        self.map().tcp.get(engine).copied().unwrap_or(0)
    }

    /// Of engines `0..engines`, the one that holds the fewest TCP flows (the lowest index
    /// among equals), if it holds fewer than engine `me`.
    pub fn fewer_tcp_flows_than(&self, me: usize, engines: usize) -> Option<usize> {
        let map = self.map();
        let held = |e: usize| map.tcp.get(e).copied().unwrap_or(0);
        let least = (0..engines).min_by_key(|&e| held(e))?;
        (held(least) < held(me)).then_some(least)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, SocketAddr};

    fn tcp(port: u16) -> FlowKey {
        let a = SocketAddr::from((Ipv4Addr::new(192, 168, 65, 2), port));
        FlowKey::Tcp { guest: a, remote: SocketAddr::from((Ipv4Addr::new(203, 0, 113, 1), 80)) }
    }

    #[test]
    fn tcp_flows_are_counted_per_engine_through_claims_and_releases() {
        let o = Owners::default();
        o.claim(tcp(1), 0);
        o.claim(tcp(1), 0);
        assert_eq!(o.tcp_flows(0), 1, "a second claim of one's own key counts once");
        assert!(o.claim_vacant(tcp(2), 1));
        assert!(!o.claim_vacant(tcp(2), 0));
        assert_eq!((o.tcp_flows(0), o.tcp_flows(1)), (1, 1));
        // A claim over another engine's key moves its count.
        o.claim(tcp(2), 0);
        assert_eq!((o.tcp_flows(0), o.tcp_flows(1)), (2, 0));
        // Releasing another engine's key changes nothing.
        o.release(&tcp(2), 1);
        assert_eq!((o.tcp_flows(0), o.owner(&tcp(2))), (2, Some(0)));
        o.release(&tcp(2), 0);
        o.release(&tcp(1), 0);
        assert_eq!((o.tcp_flows(0), o.tcp_flows(1)), (0, 0));
        // Spliced connections count, without a key.
        o.count_splice(1, true);
        o.count_splice(1, true);
        assert_eq!((o.tcp_flows(0), o.tcp_flows(1)), (0, 2));
        assert_eq!(o.fewer_tcp_flows_than(1, 2), Some(0), "splices make an engine busier");
        o.count_splice(1, false);
        o.count_splice(1, false);
        o.count_splice(1, false);
        assert_eq!(o.tcp_flows(1), 0, "never below zero");
        // UDP keys are owned but not counted.
        let udp =
            FlowKey::Udp { guest: "192.168.65.2:5000".parse().unwrap(), remote: "203.0.113.1:53".parse().unwrap() };
        o.claim(udp, 1);
        assert_eq!((o.owner(&udp), o.tcp_flows(1)), (Some(1), 0));
    }

    #[test]
    fn the_engine_with_the_fewest_tcp_flows_is_found() {
        let o = Owners::default();
        assert_eq!(o.fewer_tcp_flows_than(0, 2), None, "equal: stay");
        o.claim(tcp(1), 0);
        assert_eq!(o.fewer_tcp_flows_than(0, 2), Some(1), "an engine that never claimed holds none");
        assert_eq!(o.fewer_tcp_flows_than(1, 2), None);
        o.claim(tcp(2), 1);
        assert_eq!(o.fewer_tcp_flows_than(0, 2), None);
        o.claim(tcp(3), 1);
        o.claim(tcp(4), 1);
        assert_eq!(o.fewer_tcp_flows_than(1, 3), Some(2), "the fewest of all");
        assert_eq!(o.fewer_tcp_flows_than(1, 2), Some(0));
    }
}

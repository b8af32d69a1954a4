//! An ordered set of flow slots with O(1) insert, remove, move-to-back and oldest: a doubly
//! linked list threaded through an array indexed by slot. The flow table keeps one per
//! bounded kind of flow (connects in progress, UDP flows, ICMP flows, gateway DNS flows),
//! so that a bound is kept by taking the front (the oldest, or least recently used) without
//! scanning the table, and a flow that leaves the kind leaves nothing behind.

const NONE: u32 = u32::MAX;

#[derive(Clone, Copy)]
struct Node {
    prev: u32,
    next: u32,
    member: bool,
}

const UNLINKED: Node = Node { prev: NONE, next: NONE, member: false };

#[derive(Default)]
pub struct SlotList {
    nodes: Vec<Node>,
    head: Option<u32>,
    tail: Option<u32>,
    len: usize,
}

impl SlotList {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn contains(&self, slot: u32) -> bool {
        self.nodes.get(slot as usize).is_some_and(|n| n.member)
    }

    /// The oldest slot (least recently added or touched).
    pub fn front(&self) -> Option<u32> {
        self.head
    }

    /// Adds `slot` at the back (the newest); moves it there if it is in already.
    pub fn push_back(&mut self, slot: u32) {
        self.remove(slot);
        let i = slot as usize;
        if self.nodes.len() <= i {
            self.nodes.resize(i + 1, UNLINKED);
        }
        self.nodes[i] = Node { prev: self.tail.unwrap_or(NONE), next: NONE, member: true };
        match self.tail {
            Some(t) => self.nodes[t as usize].next = slot,
            None => self.head = Some(slot),
        }
        self.tail = Some(slot);
        self.len += 1;
    }

    /// Marks `slot` as just used: it goes to the back. Nothing if it is not in.
    pub fn touch(&mut self, slot: u32) {
        if self.contains(slot) && self.tail != Some(slot) {
            self.push_back(slot);
        }
    }

    /// Takes `slot` out; nothing if it is not in.
    pub fn remove(&mut self, slot: u32) {
        if !self.contains(slot) {
            return;
        }
        let n = self.nodes[slot as usize];
        match n.prev {
            NONE => self.head = (n.next != NONE).then_some(n.next),
            p => self.nodes[p as usize].next = n.next,
        }
        match n.next {
            NONE => self.tail = (n.prev != NONE).then_some(n.prev),
            x => self.nodes[x as usize].prev = n.prev,
        }
        self.nodes[slot as usize] = UNLINKED;
        self.len -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn order(l: &SlotList) -> Vec<u32> {
        let mut out = Vec::new();
        let mut at = l.head;
        while let Some(s) = at {
            out.push(s);
            let n = l.nodes[s as usize].next;
            at = (n != NONE).then_some(n);
        }
        out
    }

    #[test]
    fn oldest_first_touch_moves_back() {
        let mut l = SlotList::default();
        for s in [5, 1, 9] {
            l.push_back(s);
        }
        assert_eq!(order(&l), [5, 1, 9]);
        l.touch(5);
        assert_eq!(order(&l), [1, 9, 5]);
        l.remove(9);
        assert_eq!(order(&l), [1, 5]);
        l.touch(7);
        assert_eq!(l.len(), 2);
        assert_eq!(l.front(), Some(1));
        l.remove(1);
        l.remove(5);
        assert!(l.is_empty());
        assert_eq!(l.front(), None);
    }

    proptest! {
        /// The list behaves as a Vec kept in order of last use (the model).
        #[test]
        fn matches_a_vec_model(ops in proptest::collection::vec((0u8..3, 0u32..16), 0..200)) {
            let mut l = SlotList::default();
            let mut model: Vec<u32> = Vec::new();
            for (op, s) in ops {
                match op {
                    0 => { l.push_back(s); model.retain(|&x| x != s); model.push(s); }
                    1 => { l.touch(s); if model.contains(&s) { model.retain(|&x| x != s); model.push(s); } }
                    _ => { l.remove(s); model.retain(|&x| x != s); }
                }
                prop_assert_eq!(order(&l), model.clone());
                prop_assert_eq!(l.len(), model.len());
                prop_assert_eq!(l.front(), model.first().copied());
                prop_assert_eq!(l.tail, model.last().copied());
            }
        }
    }
}

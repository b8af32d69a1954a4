//! What guest data TCP flows may hold, all together: the bytes of their `pending` buffers
//! (guest data the host sockets have not taken yet, never acknowledged to the guest) are
//! counted against one budget (`--max-buffered`), shared by every flow through the switch.
//! A flow's [`Held`] says what it holds and gives it back when the flow goes.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

struct Shared {
    used: Cell<usize>,
    max: Cell<usize>,
    /// `--tcp-stall-timeout` (zero: never).
    stall_timeout: Cell<Duration>,
}

/// The shared budget (cheap to clone: a handle).
#[derive(Clone)]
pub struct Budget(Rc<Shared>);

impl Default for Budget {
    fn default() -> Self {
        let l = crate::config::Limits::default();
        Budget::new(l.max_buffered, l.tcp_stall_timeout)
    }
}

impl Budget {
    pub fn new(max: usize, stall_timeout: Duration) -> Budget {
        Budget(Rc::new(Shared { used: Cell::new(0), max: Cell::new(max), stall_timeout: Cell::new(stall_timeout) }))
    }

    pub fn set(&self, max: usize, stall_timeout: Duration) {
        self.0.max.set(max);
        self.0.stall_timeout.set(stall_timeout);
    }

    /// Bytes held by all flows.
    pub fn used(&self) -> usize {
        self.0.used.get()
    }

    pub fn max(&self) -> usize {
        self.0.max.get()
    }

    /// Bytes that may still be held.
    pub fn room(&self) -> usize {
        self.max().saturating_sub(self.used())
    }

    pub fn stall_timeout(&self) -> Option<Duration> {
        let t = self.0.stall_timeout.get();
        (!t.is_zero()).then_some(t)
    }

    pub fn hold(&self) -> Held {
        Held { budget: self.clone(), n: 0 }
    }
}

/// What one flow holds of the budget; given back when dropped.
pub struct Held {
    budget: Budget,
    n: usize,
}

impl Held {
    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    /// The flow now holds `n` bytes.
    pub fn set(&mut self, n: usize) {
        let used = &self.budget.0.used;
        used.set(used.get() - self.n + n);
        self.n = n;
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.set(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_share_the_budget_and_give_back_what_they_held() {
        let b = Budget::new(100, Duration::ZERO);
        let mut x = b.hold();
        let mut y = b.hold();
        x.set(60);
        y.set(30);
        assert_eq!((b.used(), b.room()), (90, 10));
        x.set(20);
        assert_eq!(b.used(), 50);
        drop(y);
        assert_eq!(b.used(), 20);
        y = b.hold();
        y.set(100);
        assert_eq!(b.room(), 0);
        drop(x);
        drop(y);
        assert_eq!(b.used(), 0);
        assert_eq!(b.stall_timeout(), None);
    }
}

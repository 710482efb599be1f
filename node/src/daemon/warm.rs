//! Which engines this device's engine host holds loaded, as the daemon can tell without asking the host:
//! the capability advert lists them (`Capabilities::warm`), so schedulers prefer a device that will not
//! pay a model load, and this node's own scheduler reads them for its local candidate.
//!
//! The host (`crate::host`) keeps engines by (model, adapter), least recently used first out, within its
//! memory budget (a model's size on disk stands for its memory), drops those unused for `idle_secs`, and
//! drops them all before a fine-tune or when it dies. [`WarmSet`] applies the same rules to what the job
//! manager sees: an inference that succeeded there, a fine-tune starting, a host that died. It is a hint
//! for ranking: where it is wrong (the host evicted for reasons of its own), the cost is one model load,
//! the same as without it.
use bitnode_protocol::mesh::WarmEngine;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
struct Entry {
    key: WarmEngine,
    bytes: u64,
    used: Instant,
}

#[derive(Debug, Clone)]
pub(super) struct WarmSet {
    budget: u64,
    idle: Duration,
    engines: Vec<Entry>,
    /// Bumped by every [`WarmSet::clear`]: a size read off the event loop before a clear is stale.
    epoch: u64,
}

impl WarmSet {
    /// The host's own limits: its memory budget in bytes and its idle timeout.
    pub(super) fn new(budget: u64, idle: Duration) -> WarmSet {
        WarmSet {
            budget,
            idle,
            engines: vec![],
            epoch: 0,
        }
    }

    pub(super) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// An inference on `key` (of `bytes` on disk, model and adapter) succeeded on the host at `now`:
    /// the engine is loaded and most recently used. As the host does, the least recently used go until it
    /// fits the budget (one engine is always kept).
    pub(super) fn served(&mut self, key: WarmEngine, bytes: u64, epoch: u64, now: Instant) {
        if epoch != self.epoch {
            return;
        }
        if let Some(e) = self.engines.iter_mut().find(|e| e.key == key) {
            e.used = now;
            return;
        }
        self.engines.sort_by_key(|e| e.used);
        while !self.engines.is_empty() && self.engines.iter().map(|e| e.bytes).sum::<u64>() + bytes > self.budget {
            self.engines.remove(0);
        }
        self.engines.push(Entry { key, bytes, used: now });
    }

    /// Every engine is gone: a fine-tune evicts them, and a host that died took them with it.
    pub(super) fn clear(&mut self) {
        self.engines.clear();
        self.epoch += 1;
    }

    /// Forgets the engines the host has dropped for being unused `idle` long. True when one went.
    pub(super) fn expire(&mut self, now: Instant) -> bool {
        let before = self.engines.len();
        let idle = self.idle;
        self.engines.retain(|e| now.saturating_duration_since(e.used) < idle);
        self.engines.len() != before
    }

    pub(super) fn contains(&self, key: &WarmEngine) -> bool {
        self.engines.iter().any(|e| &e.key == key)
    }

    /// The engines, most recently used first, at most `max`.
    pub(super) fn list(&self, max: usize) -> Vec<WarmEngine> {
        let mut v = self.engines.clone();
        v.sort_by_key(|e| std::cmp::Reverse(e.used));
        v.into_iter().take(max).map(|e| e.key).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(m: &str) -> WarmEngine {
        WarmEngine {
            model: m.into(),
            adapter: None,
        }
    }

    #[test]
    fn it_follows_the_hosts_lru_budget_idle_timeout_and_evictions() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let mut w = WarmSet::new(100, Duration::from_secs(60));
        let e = w.epoch();
        w.served(key("a"), 40, e, s(0));
        w.served(key("b"), 40, e, s(1));
        // Touching a makes b the least recently used; c needs room: b goes.
        w.served(key("a"), 40, e, s(2));
        w.served(key("c"), 40, e, s(3));
        assert_eq!(w.list(16), vec![key("c"), key("a")]);
        // One engine larger than the budget is still kept, alone.
        w.served(key("big"), 500, e, s(4));
        assert_eq!(w.list(16), vec![key("big")]);
        // Unused for the idle timeout: dropped.
        assert!(!w.expire(s(63)));
        assert!(w.expire(s(64)));
        assert!(w.list(16).is_empty());
        // A fine-tune (or a dead host) clears it, and a size read before that is stale.
        w.served(key("a"), 10, e, s(70));
        w.clear();
        w.served(key("b"), 10, e, s(71));
        assert!(!w.contains(&key("a")) && !w.contains(&key("b")));
        w.served(key("b"), 10, w.epoch(), s(72));
        assert!(w.contains(&key("b")));
    }
}

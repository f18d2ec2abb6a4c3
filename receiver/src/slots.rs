//! Upload slots per host, and the bytes the uploads in flight have declared (SPEC §16): one
//! host cannot hold every slot, and the free-space check counts what is already on its way.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Slots held per host and the declared bytes of every upload in flight.
#[derive(Debug)]
pub struct HostSlots {
    per_host: usize,
    held: Mutex<HashMap<String, usize>>,
    reserved: AtomicU64,
}

/// One upload's slot; gives it (and its byte reservation) back when dropped.
#[derive(Debug)]
pub struct HostSlot {
    slots: Arc<HostSlots>,
    host: String,
    bytes: u64,
}

impl HostSlots {
    pub fn new(per_host: usize) -> Arc<Self> {
        Arc::new(HostSlots {
            per_host,
            held: Mutex::new(HashMap::new()),
            reserved: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, usize>> {
        // A panic while holding this lock leaves only counters behind; keep using them.
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Slots `host` holds now.
    pub fn held_by(&self, host: &str) -> usize {
        self.lock().get(host).copied().unwrap_or(0)
    }

    /// Bytes the uploads in flight declared (Content-Length).
    pub fn reserved_bytes(&self) -> u64 {
        self.reserved.load(Ordering::Relaxed)
    }

    pub fn per_host(&self) -> usize {
        self.per_host
    }

    /// Takes a slot for `host` with `bytes` declared, or `None` when the host holds its cap.
    pub fn try_take(self: &Arc<Self>, host: &str, bytes: u64) -> Option<HostSlot> {
        let mut held = self.lock();
        let n = held.entry(host.to_string()).or_insert(0);
        if *n >= self.per_host {
            return None;
        }
        *n += 1;
        self.reserved.fetch_add(bytes, Ordering::Relaxed);
        Some(HostSlot {
            slots: self.clone(),
            host: host.to_string(),
            bytes,
        })
    }
}

impl HostSlot {
    /// `n` more body bytes arrived (and now take their room on disk): they leave the
    /// reservation, so the free-space check does not count them twice.
    pub fn progress(&mut self, n: u64) {
        let n = n.min(self.bytes);
        self.bytes -= n;
        self.slots.reserved.fetch_sub(n, Ordering::Relaxed);
    }
}

impl Drop for HostSlot {
    fn drop(&mut self) {
        self.slots.reserved.fetch_sub(self.bytes, Ordering::Relaxed);
        let mut held = self.slots.lock();
        if let Some(n) = held.get_mut(&self.host) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.host);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_is_capped_and_others_are_not() {
        let s = HostSlots::new(2);
        let a1 = s.try_take("a", 10).unwrap();
        let _a2 = s.try_take("a", 20).unwrap();
        assert!(s.try_take("a", 1).is_none());
        let b = s.try_take("b", 5).unwrap();
        assert_eq!(s.held_by("a"), 2);
        assert_eq!(s.reserved_bytes(), 35);
        drop(a1);
        assert_eq!(s.held_by("a"), 1);
        assert_eq!(s.reserved_bytes(), 25);
        let mut a3 = s.try_take("a", 7).unwrap();
        a3.progress(5);
        assert_eq!(s.reserved_bytes(), 27);
        a3.progress(100);
        assert_eq!(s.reserved_bytes(), 25, "never below what was reserved");
        drop(a3);
        assert_eq!(s.reserved_bytes(), 25);
        assert!(s.try_take("a", 1).is_some());
        drop(b);
        assert_eq!(s.held_by("b"), 0);
    }
}

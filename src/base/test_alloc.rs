//! A counting global allocator for the unit tests: how many bytes one call allocates at its
//! peak, counted per thread so that tests running in parallel do not disturb each other.
//!
//! It forwards everything to [`System`]. A reallocation counts as the new block allocated
//! before the old one is freed, which is what a moving reallocation costs at its peak.

// The one place outside `sys` that needs unsafe: implementing `GlobalAlloc` is unsafe by
// definition. Test builds only.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Counting;

#[global_allocator]
static COUNTING: Counting = Counting;

thread_local! {
    // Const-initialised `Cell`s of plain integers: accessing them never allocates and they
    // have no destructor, so the allocator can use them at any time.
    /// Bytes allocated by this thread and not yet freed (by anyone): may go negative when
    /// this thread frees another thread's memory.
    static LIVE: Cell<isize> = const { Cell::new(0) };
    /// The highest `LIVE` since the innermost running [`peak_during`] started.
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn grow(n: usize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get().saturating_add(n as isize);
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

fn shrink(n: usize) {
    let _ = LIVE.try_with(|live| live.set(live.get().saturating_sub(n as isize)));
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// `GlobalAlloc` contract is `System`'s; the counting only touches thread-local integers.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as received; the caller upholds `alloc`'s contract.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` and `layout` come from this allocator, i.e. from `System`.
        unsafe { System.dealloc(ptr, layout) };
        shrink(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`; the caller upholds `realloc`'s contract on `new_size`.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            grow(new_size);
            shrink(layout.size());
        }
        p
    }
}

/// Runs `f` and returns its result with the most bytes it had allocated at once on this thread
/// (beyond what was live when it started).
pub(crate) fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let start = LIVE.with(Cell::get);
    let outer = PEAK.with(|p| p.replace(start));
    let r = f();
    let peak = PEAK.with(|p| {
        let peak = p.get();
        p.set(outer.max(peak));
        peak
    });
    (r, (peak - start).max(0) as usize)
}

#[cfg(test)]
mod tests {
    use super::peak_during;

    #[test]
    fn counts_this_threads_peak_including_reallocations() {
        let (_, peak) = peak_during(|| {
            let mut v: Vec<u8> = Vec::with_capacity(1000);
            v.reserve_exact(3000); // old and new block both count at the moment of moving
            drop(v);
            drop(Vec::<u8>::with_capacity(10));
        });
        assert!((4000..4100).contains(&peak), "{peak}");
        let (_, peak) = peak_during(|| {
            std::thread::spawn(|| vec![0u8; 1 << 20])
                .join()
                .unwrap()
                .len()
        });
        assert!(
            peak < 1 << 20,
            "another thread's allocation was counted: {peak}"
        );
    }
}

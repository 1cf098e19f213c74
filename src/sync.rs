//! The one lock helper: a poisoned mutex (a panic while it was held) is
//! still usable, since every critical section here leaves consistent state.

use std::sync::{Mutex, MutexGuard};

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

//! Ctrl-C, SIGTERM and SIGHUP during an offline command that builds a new file under a
//! temporary name (`flatten --output`, `compact`): the temporary file goes, then the process
//! ends as the signal would have ended it. Without this, a full-size hidden file stayed behind
//! until a later run for the same output swept it.
//!
//! How: the signals are blocked in the calling thread before any other thread starts (threads
//! inherit the mask), and one thread waits for them with sigwait, so no signal handler runs
//! and the cleanup is ordinary code. A kill -9 still leaves the file; the next run's sweep
//! removes it, as before.

use cowdisk::storage::namespace::{temp_owner, Namespace, RealFs};
use std::path::Path;

/// From now on, SIGINT, SIGTERM and SIGHUP remove this process's temporary files made for
/// `purpose` next to `target` (named as `cowdisk::storage::namespace::temp_name` names them),
/// then end the process by the signal. Call before any other thread starts.
pub fn remove_temps_on_signal(target: &Path, purpose: &'static str) {
    let target = target.to_path_buf();
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use; the calls only
    // read and write it and this thread's signal mask.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return;
        }
        set
    };
    let spawned = std::thread::Builder::new().name("signals".into()).spawn(move || {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is a valid, initialised signal set; `sig` is written by sigwait.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            return;
        }
        let me = Some(Some(std::process::id()));
        for name in RealFs.siblings(&target) {
            if temp_owner(&target, purpose, &name) == me {
                let _ = std::fs::remove_file(target.with_file_name(&name));
            }
        }
        // SAFETY: restores the default action and unblocks the signal in this thread, then
        // sends it to this thread: the process ends as it would have without us.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            let mut one: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut one);
            libc::sigaddset(&mut one, sig);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &one, std::ptr::null_mut());
            libc::raise(sig);
        }
    });
    if spawned.is_err() {
        // No thread to wait for them: the signals act as before.
        // SAFETY: as above, on this thread's mask.
        unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
    }
}

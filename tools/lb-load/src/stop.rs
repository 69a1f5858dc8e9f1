//! A process-wide stop flag that signals set, for the long-running binaries
//! (lb-load, lb-demo): they check it and wind down in order.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::bail;

/// Set once one of the signals passed to [`stop_on`] arrives.
pub static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Make each of `signals` set [`STOP`] instead of ending the process.
pub fn stop_on(signals: &[libc::c_int]) -> anyhow::Result<()> {
    for &sig in signals {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe; the sigaction struct is fully initialised.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            bail!("sigaction({sig}): {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

pub fn stopped() -> bool {
    STOP.load(Ordering::SeqCst)
}

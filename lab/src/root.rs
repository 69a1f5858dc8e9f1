//! Root tests need root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN). Without it
//! they say so and skip, except in CI, where a skip would be a silent pass
//! of the whole suite, so they fail instead. Their names start with
//! `root_`.

use std::io::Write as _;

/// True when the process runs as root (effective uid 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// True when `CI` is set to `true` or `1`, as CI services do.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// Set (to anything) by the unit stage of `cargo xtask test`, which needs
/// no root: root tests among the unit tests of lb-lab and the tools skip
/// there, even in CI, because the root stage runs them.
pub const ROOT_STAGE_LATER: &str = "LB_ROOT_STAGE_LATER";

/// Call first in a root test: `if skip_without_root("name") { return; }`.
/// Prints why it skips; panics instead when running in CI.
pub fn skip_without_root(test: &str) -> bool {
    if std::env::var_os(ROOT_STAGE_LATER).is_some() {
        let _ = writeln!(std::io::stderr(), "{test}: skipped: the root stage runs it");
        return true;
    }
    if is_root() {
        return false;
    }
    if in_ci() {
        panic!("{test}: needs root, and CI=true forbids skipping");
    }
    // Straight to the stderr handle: libtest captures `eprintln!` of passing
    // tests, which would turn the skip into a silent pass. (If stderr itself
    // fails there is nowhere left to say it.)
    let _ = writeln!(std::io::stderr(), "{test}: skipped: needs root");
    true
}

/// `require_root!("test_name");` as a test's first line: returns from the
/// test when [`skip_without_root`] says to skip.
#[macro_export]
macro_rules! require_root {
    ($name:literal) => {
        if $crate::root::skip_without_root($name) {
            return;
        }
    };
}

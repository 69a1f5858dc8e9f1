//! Where the binaries of this workspace are, for the tests and tools that
//! run them (lb-agent, lb-backend, lb-load).

use std::{
    io,
    path::{Path, PathBuf},
};

/// `$env` if set; else `name` in the cargo profile directory that the
/// running executable was built into (`target/<profile>`, also for a test
/// binary in `target/<profile>/deps`). An error says how to build it.
pub fn try_built_bin(name: &str, env: &str) -> io::Result<PathBuf> {
    let path = match std::env::var_os(env) {
        Some(p) => PathBuf::from(p),
        None => profile_dir()?.join(name),
    };
    if !path.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "{name} not found at {}: build it with `cargo build -p {name}` in the profile of this binary \
                 (`--release` for `cargo xtask`, which builds it), or point {env} at it",
                path.display()
            ),
        ));
    }
    Ok(path)
}

/// [`try_built_bin`] for tests: panics with the error.
pub fn built_bin(name: &str, env: &str) -> PathBuf {
    try_built_bin(name, env).unwrap_or_else(|e| panic!("{e}"))
}

/// The cargo target directory of the running executable (`target`), where
/// builds for other targets land too (`target/<triple>/<profile>`).
pub fn target_dir() -> io::Result<PathBuf> {
    let profile = profile_dir()?;
    profile.parent().map(Path::to_owned).ok_or_else(|| no_target(&profile))
}

fn profile_dir() -> io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().ok_or_else(|| no_target(&exe))?;
    Ok(if dir.ends_with("deps") { dir.parent().ok_or_else(|| no_target(dir))? } else { dir }.to_owned())
}

fn no_target(path: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{} is not in a cargo target directory", path.display()))
}

//! The scaling timeline (`[service.instances] timeline`): every decision
//! appended to a file as one JSON line, for charts and post-mortems. The
//! write is a small blocking one, as it always was.

use std::{io::Write as _, path::Path};

use serde::Serialize;

use crate::core::policy::Decision;

/// Append `decision`, taken for `service` at `unix_time`, to `path`.
pub fn append(path: &Path, unix_time: f64, service: &str, decision: &Decision) -> std::io::Result<()> {
    #[derive(Serialize)]
    struct Line<'a> {
        unix_time: f64,
        service: &'a str,
        #[serde(flatten)]
        decision: &'a Decision,
    }
    let line = serde_json::to_string(&Line { unix_time, service, decision }).map_err(std::io::Error::other)?;
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    writeln!(f, "{line}")
}

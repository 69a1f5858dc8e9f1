//! `lb-agent top` end to end: in a real pseudo-terminal (a tmux pane) it
//! shows a running agent's service, says so when the agent stops answering
//! and picks up the restarted one, and quits on q with the terminal
//! restored; without a terminal it refuses and points elsewhere.
//!
//! Needs root, tmux and a built agent: `cargo build --release -p lb-agent &&
//! cargo test -p lb-tests --release --test e2e_top -- --test-threads=1`.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use lb_lab::{
    agent::{agent_bin, run_agent_cli},
    require_root,
    topology::{Options, Topology},
};

/// A tmux server of this test's own (`-L`), killed on drop.
struct Tmux {
    name: String,
}

impl Tmux {
    fn start(command: &str) -> Tmux {
        let t = Tmux { name: format!("lb-top-test-{}", std::process::id()) };
        t.run(&["new-session", "-d", "-x", "120", "-y", "40", "-s", "top", command]);
        t
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux").arg("-L").arg(&self.name).args(args).output().expect("run tmux");
        assert!(out.status.success(), "tmux {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "top"])
    }

    fn format(&self, f: &str) -> String {
        self.run(&["display-message", "-p", "-t", "top", f]).trim().to_owned()
    }

    /// Poll the screen until `pred` holds (at most `limit`).
    fn wait_for(&self, what: &str, limit: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let s = self.screen();
            if pred(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "no {what} within {limit:?}; the screen:\n{s}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux").arg("-L").arg(&self.name).arg("kill-server").status();
    }
}

fn top_command(socket: &Path) -> String {
    // The exit status stays on the screen after top restored it.
    format!(
        "{} top --interval 200ms --api-socket {}; echo top-exited=$?; sleep 60",
        agent_bin().display(),
        socket.display()
    )
}

#[test]
fn root_top_shows_the_service_survives_a_restart_and_quits_on_q() {
    require_root!("root_top_shows_the_service_survives_a_restart_and_quits_on_q");
    let topo = Topology::build(Options::with_backends(&["web-1"]));
    topo.write_config(&[("web-1", 1)]);
    let mut agent = topo.start_agent();
    let vip = topo.vip_tcp().to_string();
    let tmux = Tmux::start(&top_command(&topo.api_socket()));
    let s = tmux.wait_for("the web service", Duration::from_secs(10), |s| s.contains(&format!("{vip}/tcp")));
    assert!(s.contains("services") && s.contains("USABLE") && s.contains("1/1"), "{s}");
    assert_eq!(tmux.format("#{alternate_on}"), "1", "top draws on the alternate screen");
    // The agent goes away and comes back: top says so, then shows it again.
    agent.kill();
    tmux.wait_for("\"agent not answering\"", Duration::from_secs(5), |s| s.contains("agent not answering"));
    agent.respawn();
    agent.wait_ready();
    tmux.wait_for("the agent back", Duration::from_secs(10), |s| {
        !s.contains("agent not answering") && s.contains(&format!("{vip}/tcp"))
    });
    tmux.run(&["send-keys", "-t", "top", "q"]);
    let s = tmux.wait_for("top's exit", Duration::from_secs(5), |s| s.contains("top-exited="));
    assert!(s.contains("top-exited=0"), "{s}");
    assert!(!s.contains("USABLE"), "the view is gone: {s}");
    assert_eq!(tmux.format("#{alternate_on}"), "0", "back on the normal screen");
    assert_eq!(tmux.format("#{cursor_flag}"), "1", "the cursor shows again");
}

#[test]
fn root_top_without_a_terminal_points_to_status() {
    require_root!("root_top_without_a_terminal_points_to_status");
    let out = run_agent_cli(&["top", "--api-socket", "/nonexistent/lb.sock"]);
    assert!(!out.status.success(), "{out:?}");
    assert!(out.stderr.contains("top needs a terminal"), "{out:?}");
    assert!(out.stderr.contains("status --watch") && out.stderr.contains("status --json"), "{out:?}");
}

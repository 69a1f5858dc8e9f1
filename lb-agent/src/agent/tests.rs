//! The agent's loop and the replica lifecycle, driven through the control
//! API's channel against the fakes of `testing`, on tokio's paused clock:
//! a minute of agent time takes milliseconds, and a loop that waited on a
//! hung call would let the clock run out a test's timeout.

use std::{future::Future, net::SocketAddr, path::PathBuf, time::Duration};

use tokio::{
    sync::{mpsc, oneshot},
    time::{sleep, timeout},
};

use super::{Agent, Inputs, Options, Ports};
use crate::{
    config::Config,
    ports::{Replica, Route},
    serve::api::{Call, Request, Response},
    status::{ReplicaStatus, Snapshot},
    testing::{
        scaled, scaled_service, scratch_dir, web, Answer, FakeOrchestrator, FakeOrchestrators, FakeProber,
        SharedDataplane,
    },
};

type TestAgent = Agent<SharedDataplane, FakeOrchestrators, FakeProber>;

/// The fakes an agent runs against, and its config file.
struct World {
    dir: PathBuf,
    config: PathBuf,
    dp: SharedDataplane,
    orchs: FakeOrchestrators,
    prober: FakeProber,
}

impl World {
    fn new(config: &str) -> World {
        let dir = scratch_dir("agent");
        let w = World {
            config: dir.join("lb.toml"),
            dir,
            dp: SharedDataplane::default(),
            orchs: FakeOrchestrators::default(),
            prober: FakeProber::default(),
        };
        w.write_config(config);
        w
    }

    fn write_config(&self, text: &str) {
        std::fs::write(&self.config, text).unwrap();
    }

    async fn start(&self) -> TestAgent {
        let options = Options {
            config: self.config.clone(),
            api_socket: self.dir.join("api.sock"),
            metrics_address: None,
            pin_dir: None,
            keep_on_exit: false,
        };
        let ports =
            Ports { dataplane: self.dp.clone(), orchestrators: self.orchs.clone(), prober: self.prober.clone() };
        Agent::start(options, Config::load(&self.config).unwrap(), ports).await.unwrap()
    }

    /// Start an agent here and serve it while `script` runs.
    async fn run<Fut: Future<Output = ()>>(&self, script: impl FnOnce(Driver) -> Fut) {
        drive(self.start().await, script).await
    }

    fn web(&self) -> FakeOrchestrator {
        self.orchs.of("web")
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The test's side of the loop's inputs; dropping it shuts the loop down.
struct Driver {
    calls: mpsc::Sender<Call>,
    _hangups: mpsc::Sender<()>,
    _shutdown: oneshot::Sender<&'static str>,
}

impl Driver {
    async fn call(&self, request: Request) -> Response {
        let (tx, rx) = oneshot::channel();
        self.calls.send((request, tx)).await.unwrap();
        rx.await.expect("the agent dropped the call")
    }

    async fn status(&self) -> Snapshot {
        *self.call(Request::Status).await.status.expect("a status")
    }

    /// Poll `status` every 100 ms until `done` holds, for at most `limit`.
    async fn until(&self, limit: Duration, what: &str, done: impl Fn(&Snapshot) -> bool) -> Snapshot {
        let give_up = tokio::time::Instant::now() + limit;
        loop {
            let s = self.status().await;
            if done(&s) {
                return s;
            }
            assert!(tokio::time::Instant::now() < give_up, "{what}: not within {limit:?}; last status:\n{s:#?}");
            sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Serve `agent` while `script` runs; the loop shuts down when it ends.
async fn drive<Fut: Future<Output = ()>>(agent: TestAgent, script: impl FnOnce(Driver) -> Fut) {
    let (calls, call_rx) = mpsc::channel(8);
    let (hangups, hangup_rx) = mpsc::channel(1);
    let (shutdown, shutdown_rx) = oneshot::channel();
    let inputs = Inputs { calls: call_rx, hangups: hangup_rx, shutdown: shutdown_rx };
    let driver = Driver { calls, _hangups: hangups, _shutdown: shutdown };
    let (stopped, ()) = tokio::join!(agent.serve(inputs), script(driver));
    assert!(!stopped, "the loop ended on a stop call");
}

/// "web" and a second scaled service, "api".
fn web_and_api() -> String {
    scaled(1, 1, "") + &scaled_service("api", 101, 1, (1, 1), "")
}

fn replicas(s: &Snapshot) -> &[ReplicaStatus] {
    s.scaling.first().map_or(&[], |sc| &sc.replicas[..])
}

fn phases(s: &Snapshot) -> Vec<(&str, &str)> {
    replicas(s).iter().map(|r| (r.id.as_str(), r.phase.as_str())).collect()
}

fn has_event(s: &Snapshot, needle: &str) -> bool {
    s.events.iter().any(|e| e.message.contains(needle))
}

fn addr(n: u8) -> SocketAddr {
    SocketAddr::new([10, 9, 0, n].into(), 8080)
}

/// Instances `i1..=in` all ready and in the table.
async fn all_ready(d: &Driver, n: usize) -> Snapshot {
    d.until(Duration::from_secs(10), "instances ready", |s| {
        replicas(s).len() == n && replicas(s).iter().all(|r| r.phase == "ready")
    })
    .await
}

#[tokio::test(start_paused = true)]
async fn scale_up_starts_probes_and_adds_instances_to_the_table() {
    let w = &World::new(&scaled(1, 4, ""));
    w.run(|d| async move {
        all_ready(&d, 1).await;
        assert!(w.dp.in_table(addr(1)));
        // 150% of a core against a 50% target: three instances.
        w.web().lock().cpu.insert("i1".into(), 150.0);
        let s = all_ready(&d, 3).await;
        assert_eq!(w.web().lock().starts, 3);
        assert!(has_event(&s, "web: scale 1 -> 3"), "{:#?}", s.events);
        assert!(has_event(&s, "instance web-3 ready after"), "{:#?}", s.events);
        assert_eq!(w.dp.lock().live_backends(), [addr(1), addr(2), addr(3)].into());
        assert!((1..=3).all(|n| w.dp.in_table(addr(n))), "not all in the table: {:?}", w.dp.lock().in_tables());
        // Probed ready before it joined: every instance was probed.
        assert!(w.prober.lock().probes >= 3);
    })
    .await;
    // Shutting down stops every instance and releases the orchestrator.
    assert_eq!(w.web().lock().stopped.len(), 3);
    assert!(w.web().lock().released);
    assert!(w.dp.lock().removed_all);
}

#[tokio::test(start_paused = true)]
async fn an_instance_not_ready_stays_out_of_the_table_until_it_is() {
    let w = &World::new(&scaled(1, 1, ""));
    w.prober.lock().down.insert(addr(1));
    w.run(|d| async move {
        sleep(Duration::from_secs(5)).await;
        let s = d.status().await;
        assert_eq!(phases(&s), [("i1", "starting")]);
        assert!(w.dp.lock().live_backends().is_empty());
        w.prober.lock().down.clear();
        all_ready(&d, 1).await;
        assert_eq!(w.dp.lock().live_backends(), [addr(1)].into());
    })
    .await;
}

/// Two ready instances, i1 with 5 open flows and i2 with 2; then the config
/// (with `extra`) asks for one: i2, with fewer flows, drains.
async fn drain_one_of_two(w: &World, d: &Driver, extra: &str) {
    all_ready(d, 2).await;
    w.dp.set_open(addr(1), 5);
    w.dp.set_open(addr(2), 2);
    // A walk must have seen the flows before the decision picks a victim.
    sleep(Duration::from_secs(1)).await;
    w.write_config(&scaled(1, 1, extra));
    assert!(d.call(Request::Reload).await.ok);
    let s = d.until(Duration::from_secs(5), "i2 draining", |s| phases(s).contains(&("i2", "draining"))).await;
    let b = &s.services[0].backends.iter().find(|b| b.address == addr(2).to_string()).unwrap();
    assert_eq!((b.state.as_str(), b.in_table, b.open_connections), ("draining", false, 2));
    assert!(has_event(&s, "draining instance web-2"), "{:#?}", s.events);
}

#[tokio::test(start_paused = true)]
async fn a_drain_that_reaches_zero_connections_stops_the_instance_after() {
    let w = &World::new(&scaled(2, 2, ""));
    w.run(|d| async move {
        drain_one_of_two(w, &d, "").await;
        let id = w.dp.lock().backend_id(addr(2)).unwrap();
        sleep(Duration::from_secs(5)).await;
        assert!(w.web().lock().stopped.is_empty(), "stopped while connections were open");
        assert!(w.dp.lock().flushes.is_empty());
        w.dp.set_open(addr(2), 0);
        let s = d.until(Duration::from_secs(3), "i2 stopped", |s| phases(s) == [("i1", "ready")]).await;
        assert!(has_event(&s, "web: 10.9.0.2:8080 drained"), "{:#?}", s.events);
        assert!(has_event(&s, "web: stopped instance web-2"), "{:#?}", s.events);
        assert_eq!(w.web().lock().stopped, ["i2"]);
        // Its (closed) flows were forgotten, then it left the maps.
        assert_eq!(w.dp.lock().flushes, [id]);
        assert_eq!(w.dp.lock().live_backends(), [addr(1)].into());
        // Well before the default 30 s deadline.
        assert!(!has_event(&s, "deadline"));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_drain_that_hits_its_deadline_flushes_the_flows_and_stops_the_instance() {
    let w = &World::new(&scaled(2, 2, "drain_timeout = \"2s\""));
    w.run(|d| async move {
        drain_one_of_two(w, &d, "drain_timeout = \"2s\"").await;
        let id = w.dp.lock().backend_id(addr(2)).unwrap();
        let drained_at = tokio::time::Instant::now();
        let s = d.until(Duration::from_secs(5), "i2 stopped", |s| phases(s) == [("i1", "ready")]).await;
        let took = drained_at.elapsed();
        assert!(took >= Duration::from_millis(1500) && took <= Duration::from_secs(3), "cut after {took:?}");
        assert!(has_event(&s, "web: 10.9.0.2:8080 drain deadline passed, 2 open flow(s) cut"), "{:#?}", s.events);
        assert_eq!(w.dp.lock().flushes, [id]);
        assert_eq!(w.dp.lock().open.get(&id), None);
        assert_eq!(w.web().lock().stopped, ["i2"]);
        // i1 kept its flows.
        let dp = w.dp.lock();
        assert_eq!(dp.open.get(&dp.backend_id(addr(1)).unwrap()), Some(&5));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_crashed_instance_leaves_the_table_at_once_and_is_replaced() {
    let w = &World::new(&scaled(1, 1, ""));
    w.run(|d| async move {
        all_ready(&d, 1).await;
        let id = w.dp.lock().backend_id(addr(1)).unwrap();
        w.dp.set_open(addr(1), 4);
        let crashed_at = tokio::time::Instant::now();
        w.web().exit("i1");
        d.until(Duration::from_secs(1), "i1 out of the table", |_| w.dp.lock().live_backends().is_empty()).await;
        assert!(crashed_at.elapsed() <= Duration::from_millis(600), "left after {:?}", crashed_at.elapsed());
        let s = d.until(Duration::from_secs(10), "i2 replaces i1", |s| phases(s) == [("i2", "ready")]).await;
        assert!(has_event(&s, "instance web-1 (10.9.0.1:8080) exited; removed, will be replaced"), "{:#?}", s.events);
        // Its flows were flushed so that clients fail fast.
        assert_eq!(w.dp.lock().flushes, [id]);
        assert_eq!(w.web().lock().stopped, ["i1"]);
        assert_eq!(w.web().lock().starts, 2);
        assert_eq!(w.dp.lock().live_backends(), [addr(2)].into());
        let decisions = &s.scaling[0].decisions;
        assert!(decisions.iter().any(|d| d.rule == "replace"), "{decisions:#?}");
    })
    .await;
}

/// Reload `text` through the API; it must be refused. Returns the error.
async fn refuse(w: &World, d: &Driver, text: &str, why: &str) -> String {
    w.write_config(text);
    let r = d.call(Request::Reload).await;
    assert!(!r.ok, "{why}: accepted");
    let e = r.error.unwrap();
    assert!(e.starts_with("config refused (api); keeping the running one: "), "{why}: {e}");
    e
}

#[tokio::test(start_paused = true)]
async fn a_refused_reload_keeps_the_running_config_and_starts_nothing() {
    let w = &World::new(&scaled(1, 1, ""));
    w.run(|d| async move {
        let before = all_ready(&d, 1).await;
        // A file that does not parse.
        refuse(w, &d, "[[service]]\nname = 3\n", "bad toml").await;
        // A new scaled service on web's bridge and subnet.
        let shared = scaled(1, 1, "") + &scaled_service("api", 101, 0, (1, 1), "");
        let e = refuse(w, &d, &shared, "shared bridge").await;
        let says = "service[1] \"api\": instances.process.bridge: \"lbp0\" is also the bridge of service[0] \"web\"";
        assert!(e.contains(says), "{e}");
        assert_eq!(w.orchs.lock().makes, 1, "an orchestrator made for a refused config");
        // A new scaled service whose orchestrator cannot be made.
        w.orchs.lock().make = Answer::Fail;
        let e = refuse(w, &d, &web_and_api(), "factory fails").await;
        assert!(e.contains("service \"api\": set up its instances"), "{e}");
        // One whose interface does not exist: its orchestrator is released.
        w.orchs.lock().make = Answer::Ok;
        w.dp.lock().missing_interfaces.insert("lbp1".into());
        let e = refuse(w, &d, &web_and_api(), "missing interface").await;
        assert!(e.contains("no interface named \"lbp1\""), "{e}");
        sleep(Duration::from_secs(1)).await;
        assert!(w.orchs.of("api").lock().released);
        assert_eq!(w.orchs.of("api").lock().starts, 0);

        let s = d.status().await;
        let refused = |why: &str| s.events.iter().filter(|e| e.message.starts_with(why)).count() as u64;
        assert_eq!(refused("config refused (api)"), 4);
        // The tick may have seen the file change too, and refused it again.
        let again = refused("config refused (file changed)");
        assert_eq!(s.agent.errors_total, before.agent.errors_total + 4 + again);
        assert_eq!(s.services.len(), 1);
        assert_eq!(s.scaling.len(), 1, "a scaler for a refused config");
        assert_eq!(phases(&s), [("i1", "ready")]);
        assert_eq!(w.web().lock().starts, 1);
        assert!(!w.dp.lock().attached.contains_key("lbp1"));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_reload_that_newly_scales_a_service_applies_once_its_orchestrator_is_made() {
    let w = &World::new(&scaled(1, 1, ""));
    w.run(|d| async move {
        all_ready(&d, 1).await;
        w.write_config(&web_and_api());
        let r = d.call(Request::Reload).await;
        assert!(r.ok, "{r:?}");
        assert!(r.message.unwrap().starts_with("config applied (api)"));
        let s = d
            .until(Duration::from_secs(10), "api ready", |s| {
                s.scaling.iter().any(|sc| sc.service == "api" && sc.replicas.iter().any(|r| r.phase == "ready"))
            })
            .await;
        assert_eq!(s.services.len(), 2);
        assert!(w.dp.lock().attached.contains_key("lbp1"));
        // Back to "web" alone: "api" stops its instance and is released.
        w.write_config(&scaled(1, 1, ""));
        assert!(d.call(Request::Reload).await.ok);
        let s = d.until(Duration::from_secs(5), "api retired", |s| has_event(s, "api: no longer scaled")).await;
        assert_eq!(s.scaling.len(), 1);
        assert_eq!(w.orchs.of("api").lock().stopped, ["i1"]);
        assert!(w.orchs.of("api").lock().released);
    })
    .await;
}

/// The loop answers `status` within 100 ms of agent time while `hang` makes
/// an orchestrator call (or the factory) never return.
async fn status_answers_while(hang: impl FnOnce(&World), then: impl Fn(&Snapshot)) {
    let w = &World::new(&scaled(1, 1, ""));
    let agent = w.start().await;
    hang(w);
    drive(agent, |d| async move {
        // Let a scale-up (and whatever hangs) get under way.
        sleep(Duration::from_millis(1500)).await;
        for _ in 0..5 {
            // Agent time: were the loop waiting on the hung call, the
            // paused clock would run on to the timeout.
            let s = timeout(Duration::from_millis(100), d.status()).await.expect("status not answered within 100 ms");
            then(&s);
            sleep(Duration::from_millis(300)).await;
        }
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn status_is_answered_within_100ms_while_a_start_hangs() {
    status_answers_while(
        |w| w.web().lock().start = Answer::Hang,
        |s| {
            assert_eq!(s.scaling[0].pending_starts, 1, "no scale-up under way");
            assert!(s.scaling[0].replicas.is_empty());
        },
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn status_is_answered_within_100ms_while_a_listing_hangs() {
    status_answers_while(|w| w.web().lock().list = Answer::Hang, |s| assert_eq!(s.services.len(), 1)).await;
}

#[tokio::test(start_paused = true)]
async fn status_is_answered_within_100ms_while_a_reload_waits_for_its_orchestrator() {
    let w = &World::new(&scaled(1, 1, ""));
    w.run(|d| async move {
        all_ready(&d, 1).await;
        w.orchs.lock().make = Answer::Hang;
        w.write_config(&web_and_api());
        let (tx, reload) = oneshot::channel();
        d.calls.send((Request::Reload, tx)).await.unwrap();
        sleep(Duration::from_millis(500)).await;
        let s = timeout(Duration::from_millis(100), d.status()).await.expect("status not answered within 100 ms");
        // The reload is not applied until its orchestrator is made.
        assert_eq!(s.services.len(), 1);
        assert_eq!(phases(&s), [("i1", "ready")]);
        drop(reload);
    })
    .await;
}

/// A TCP check every second, 2 to go down, 2 to come back.
const CHECK: &str = r#"health_check = { kind = "tcp", interval = "1s", fall = 2, rise = 2 }"#;

/// "web" with two checked backends, 10.1.0.1:80 and 10.1.0.2:80.
fn two_checked_backends() -> World {
    World::new(&web(CHECK, &["10.1.0.1:80", "10.1.0.2:80"]))
}

/// The maps as an agent that was SIGKILLed leaves them: the next agent
/// started in `w` adopts them.
fn leave_pinned(w: &World) {
    let pinned = w.dp.lock().pinned_state();
    w.dp.lock().pinned = Some(pinned);
}

/// `addr`, down, starts passing its probes: it comes back into the table.
async fn comes_back(w: &World, d: &Driver, addr: SocketAddr) {
    w.prober.lock().down.clear();
    d.until(Duration::from_secs(5), "back up", |s| has_event(s, &format!("web: {addr} up"))).await;
    assert!(w.dp.in_table(addr), "not back in the table after passing its checks");
}

#[tokio::test(start_paused = true)]
async fn a_backend_that_fails_its_probes_leaves_the_table_and_comes_back() {
    let w = &two_checked_backends();
    let down: SocketAddr = "10.1.0.2:80".parse().unwrap();
    w.run(|d| async move {
        assert!(w.dp.in_table(down));
        w.prober.lock().down.insert(down);
        let s = d
            .until(Duration::from_secs(5), "10.1.0.2 down", |s| {
                s.services[0].backends.iter().any(|b| b.address == down.to_string() && b.state == "down")
            })
            .await;
        assert!(has_event(&s, "web: 10.1.0.2:80 down (connection refused (fake))"), "{:#?}", s.events);
        assert!(!w.dp.in_table(down), "still in the table");
        comes_back(w, &d, down).await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn editing_the_check_keeps_down_backends_down() {
    let w = &two_checked_backends();
    let both: [SocketAddr; 2] = ["10.1.0.1:80".parse().unwrap(), "10.1.0.2:80".parse().unwrap()];
    w.prober.lock().down.extend(both);
    w.run(|d| async move {
        d.until(Duration::from_secs(5), "both down", |s| s.services[0].backends.iter().all(|b| b.state == "down"))
            .await;
        let slower = r#"health_check = { kind = "tcp", interval = "3s", fall = 2, rise = 2 }"#;
        w.write_config(&web(slower, &["10.1.0.1:80", "10.1.0.2:80"]));
        assert!(d.call(Request::Reload).await.ok);
        let s = d.status().await;
        let states: Vec<&str> = s.services[0].backends.iter().map(|b| b.state.as_str()).collect();
        assert_eq!(states, ["down", "down"], "a reload that edits only the interval brought them back");
        assert!(both.iter().all(|b| !w.dp.in_table(*b)), "back in the table after the reload");
        // Still probed, at the new interval: `rise` good probes bring them back.
        w.prober.lock().down.clear();
        d.until(Duration::from_secs(10), "back up", |s| s.services[0].backends.iter().all(|b| b.state == "active"))
            .await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_backend_down_before_a_restart_stays_out_until_it_passes_its_checks() {
    let w = &two_checked_backends();
    let down: SocketAddr = "10.1.0.2:80".parse().unwrap();
    w.prober.lock().down.insert(down);
    w.run(|d| async move {
        d.until(Duration::from_secs(5), "10.1.0.2 down", |s| has_event(s, "web: 10.1.0.2:80 down")).await;
    })
    .await;
    leave_pinned(w);
    w.run(|d| async move {
        let s = d.status().await;
        assert!(has_event(&s, "restarted, adopted the running data plane"), "{:#?}", s.events);
        let state =
            |s: &Snapshot| s.services[0].backends.iter().find(|b| b.address == down.to_string()).unwrap().state.clone();
        assert_eq!(state(&s), "down");
        assert!(!w.dp.in_table(down), "back in the table before it passed a check");
        sleep(Duration::from_secs(5)).await;
        assert!(!w.dp.in_table(down), "back in the table while failing its checks");
        assert!(w.dp.in_table("10.1.0.1:80".parse().unwrap()));
        comes_back(w, &d, down).await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_restart_keeps_the_instances_it_finds_serving_in_the_table() {
    let w = &World::new(&scaled(2, 2, ""));
    w.run(|d| async move {
        all_ready(&d, 2).await;
    })
    .await;
    // As a SIGKILL leaves it: the maps pinned, i1 and i2 running, and i3
    // started but not yet in the table.
    leave_pinned(w);
    let instance = |n: u8| Replica {
        id: format!("i{n}"),
        name: format!("web-{n}"),
        addr: std::net::SocketAddrV4::new([10, 9, 0, n].into(), 8080),
        running: true,
    };
    w.orchs.lock().left.insert("web".into(), vec![instance(1), instance(2), instance(3)]);
    let agent = w.start().await;
    // Before the loop runs a probe: the first sync kept them in the table.
    assert!(w.dp.in_table(addr(1)) && w.dp.in_table(addr(2)), "{:?}", w.dp.lock().in_tables());
    assert!(!w.dp.in_table(addr(3)));
    drive(agent, |d| async move {
        let s = d.status().await;
        assert_eq!(phases(&s)[..2], [("i1", "ready"), ("i2", "ready")]);
        assert!(has_event(&s, "web: adopted running instance web-1 (10.9.0.1:8080), serving"), "{:#?}", s.events);
        // i3 is adopted by the scaler's listing, as before; two ready are
        // enough, so it is stopped again.
        let s = d.until(Duration::from_secs(5), "i3 stopped", |s| phases(s).len() == 2).await;
        assert_eq!(phases(&s), [("i1", "ready"), ("i2", "ready")]);
        assert_eq!(w.web().lock().stopped, ["i3"]);
        assert_eq!(w.web().lock().starts, 0);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_udp_backend_that_goes_down_loses_its_flows_and_a_tcp_one_keeps_them() {
    let check = CHECK;
    let udp = "\n[[service]]\nname = \"dns\"\nvip = \"10.0.0.100\"\nport = 53\nprotocol = \"udp\"\n\
               interfaces = [\"eth0\"]\n";
    let udp = format!(
        "{udp}{check}\n[[service.backend]]\naddress = \"10.2.0.1:53\"\n[[service.backend]]\naddress = \"10.2.0.2:53\"\n"
    );
    let w = &World::new(&(web(check, &["10.1.0.1:80", "10.1.0.2:80"]) + &udp));
    let (tcp_down, udp_down): (SocketAddr, SocketAddr) =
        ("10.1.0.2:80".parse().unwrap(), "10.2.0.2:53".parse().unwrap());
    w.run(|d| async move {
        let (tcp_id, udp_id) = {
            let dp = w.dp.lock();
            (dp.backend_id(tcp_down).unwrap(), dp.backend_id(udp_down).unwrap())
        };
        w.dp.set_open(tcp_down, 4);
        w.dp.set_open(udp_down, 3);
        w.prober.lock().down.extend([tcp_down, udp_down]);
        d.until(Duration::from_secs(5), "both down", |s| {
            has_event(s, "web: 10.1.0.2:80 down") && has_event(s, "dns: 10.2.0.2:53 down")
        })
        .await;
        sleep(Duration::from_secs(1)).await;
        let dp = w.dp.lock();
        assert_eq!(dp.flushes, [udp_id], "tcp id {tcp_id}");
        assert_eq!(dp.open.get(&tcp_id), Some(&4));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn status_reports_a_walk_taken_after_the_call() {
    let w = &World::new(&scaled(1, 1, ""));
    w.run(|d| async move {
        all_ready(&d, 1).await;
        // Set between two ticks: the very next status sees it.
        w.dp.set_open(addr(1), 7);
        let s = d.status().await;
        assert_eq!(s.services[0].backends[0].open_connections, 7);
        assert_eq!(s.maps.iter().find(|m| m.name == lb_common::CONNTRACK).unwrap().entries, 7, "one entry per flow");
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn socket_lb_follows_the_config_and_the_cgroup2_mount() {
    let w = &World::new(&scaled(1, 1, ""));
    // No cgroup v2 mount: the agent runs without it and says why.
    w.run(|d| async move {
        let s = d.status().await;
        assert!(!s.agent.socket_lb.attached);
        assert!(s.agent.socket_lb.note.contains("no cgroup v2 mount"), "{:?}", s.agent.socket_lb);
        assert_eq!(w.dp.lock().socket_lb, None);
        // A cgroup named in the config is attached on reload, moved on the
        // next, and detached when the config turns it off.
        for cgroup in ["/sys/fs/cgroup/lb", "/sys/fs/cgroup/other"] {
            w.write_config(&format!("{}\n[socket_lb]\ncgroup = {cgroup:?}\n", scaled(1, 1, "")));
            assert!(d.call(Request::Reload).await.ok);
            assert_eq!(w.dp.lock().socket_lb, Some(PathBuf::from(cgroup)));
            let s = d.status().await;
            assert!(s.agent.socket_lb.attached && s.agent.socket_lb.cgroup.as_deref() == Some(cgroup));
        }
        w.write_config(&format!("{}\n[socket_lb]\nenabled = false\n", scaled(1, 1, "")));
        assert!(d.call(Request::Reload).await.ok);
        assert_eq!(w.dp.lock().socket_lb, None);
        assert!(d.status().await.agent.socket_lb.note.contains("disabled"));
    })
    .await;
    // With a mount, the default attaches there.
    w.dp.lock().cgroup2_mount = Some("/sys/fs/cgroup/unified".into());
    w.write_config(&scaled(1, 1, ""));
    w.run(|d| async move {
        let s = d.status().await;
        assert_eq!(s.agent.socket_lb.cgroup.as_deref(), Some("/sys/fs/cgroup/unified"));
        assert_eq!(w.dp.lock().socket_lb, Some(PathBuf::from("/sys/fs/cgroup/unified")));
    })
    .await;
}

/// Write `text` over the config file, keeping its mtime as it was.
fn rewrite_keeping_mtime(w: &World, text: &str) {
    let mtime = std::fs::metadata(&w.config).unwrap().modified().unwrap();
    w.write_config(text);
    std::fs::File::options().write(true).open(&w.config).unwrap().set_modified(mtime).unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_empty_or_truncated_file_is_refused_shown_in_status_and_leaves_nothing_behind() {
    let full = web_and_api();
    let w = &World::new(&full);
    w.run(|d| async move {
        let before = all_ready(&d, 1).await;
        let live = w.dp.lock().live_backends();
        let makes = w.orchs.lock().makes;
        // Cut short inside "api", cut short before any service, empty.
        let cut = &full[..full.find("name = \"api\"").unwrap() + 20];
        for (text, says) in [(cut, "config"), ("# lb.toml\n[socket_lb]\n", "names no services"), ("", "it is empty")] {
            w.write_config(text);
            sleep(Duration::from_secs(2)).await;
            let s = d.status().await;
            let refused = s.agent.config_refused.as_ref().unwrap_or_else(|| panic!("{text:?}: not refused"));
            assert!(refused.message.starts_with("config refused (file changed)"), "{refused:?}");
            assert!(refused.message.contains(says), "{text:?}: {}", refused.message);
            assert!(refused.unix_time > 0.0);
            assert_eq!(s.services.len(), 2, "{text:?}: the running config changed");
            assert_eq!(s.scaling.len(), 2);
            assert_eq!(w.dp.lock().live_backends(), live);
            assert_eq!(w.orchs.lock().makes, makes, "an orchestrator made for a refused file");
            assert!(!w.orchs.of("api").lock().released && !w.orchs.of("web").lock().released);
        }
        assert!(d.status().await.render_table().contains("last reload refused"));
        // The whole file again: the refusal is over.
        w.write_config(&full);
        sleep(Duration::from_secs(2)).await;
        let s = d.status().await;
        assert_eq!(s.agent.config_refused, None);
        assert_eq!(s.services.len(), before.services.len());
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_change_that_keeps_the_size_and_mtime_is_still_applied() {
    let w = &World::new(&scaled(1, 1, ""));
    w.run(|d| async move {
        all_ready(&d, 1).await;
        let moved = scaled(1, 1, "").replace("10.0.0.100", "10.0.0.200");
        rewrite_keeping_mtime(w, &moved);
        d.until(Duration::from_secs(3), "the new VIP in force", |s| s.services.iter().any(|s| s.vip == "10.0.0.200"))
            .await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn an_api_change_whose_map_write_fails_is_rolled_back() {
    let w = &World::new(&web("", &["10.1.0.1:80"]));
    let (failed, added): (SocketAddr, SocketAddr) = ("10.1.0.2:80".parse().unwrap(), "10.1.0.3:80".parse().unwrap());
    w.run(|d| async move {
        w.dp.lock().fail_backend_writes = true;
        let r = d.call(Request::AddBackend { service: "web".into(), address: failed, weight: 1 }).await;
        assert!(!r.ok, "{r:?}");
        w.dp.lock().fail_backend_writes = false;
        // The next change is not held up by the failed one, nor carries it.
        let r = d.call(Request::AddBackend { service: "web".into(), address: added, weight: 1 }).await;
        assert!(r.ok, "{r:?}");
        let s = d.status().await;
        let listed: Vec<&str> = s.services[0].backends.iter().map(|b| b.address.as_str()).collect();
        assert_eq!(listed, ["10.1.0.1:80", "10.1.0.3:80"]);
        assert_eq!(w.dp.lock().live_backends(), ["10.1.0.1:80".parse().unwrap(), added].into());
        // Re-adding it now works: it was never registered.
        let r = d.call(Request::AddBackend { service: "web".into(), address: failed, weight: 1 }).await;
        assert!(r.ok, "{r:?}");
    })
    .await;
}

/// The decisions' rules, most recent first.
fn rules(s: &Snapshot) -> Vec<&str> {
    s.scaling.first().map_or(Vec::new(), |sc| sc.decisions.iter().map(|d| d.rule.as_str()).collect())
}

#[tokio::test(start_paused = true)]
async fn an_operator_pin_holds_the_count_through_a_reload_until_resumed() {
    let config = scaled(1, 4, "") + "[service.scaling.scale_down]\nstabilization_window = \"0s\"\n";
    let w = &World::new(&config);
    w.run(|d| async move {
        all_ready(&d, 1).await;
        // Idle: the policy alone would keep one.
        w.web().lock().cpu.insert("i1".into(), 5.0);
        let pin = |replicas| Request::PinReplicas { service: "web".into(), replicas };
        let r = d.call(pin(9)).await;
        assert!(
            !r.ok && r.error.as_deref().unwrap_or("").contains("outside min_replicas 1 ..= max_replicas 4"),
            "{r:?}"
        );
        let r = d.call(Request::PinReplicas { service: "nope".into(), replicas: 2 }).await;
        assert_eq!(r.error.as_deref(), Some("no service \"nope\""));

        assert!(d.call(pin(3)).await.ok);
        let s = all_ready(&d, 3).await;
        let hold = s.scaling[0].hold.as_ref().expect("held");
        assert_eq!((hold.mode.as_str(), hold.replicas), ("pinned", 3));
        assert!(has_event(&s, "api: web: pinned at 3 by operator"), "{:#?}", s.events);
        assert!(has_event(&s, "web: scale 1 -> 3 (pinned: pinned at 3 by the operator; the policy would ask for 1"));
        assert_eq!(rules(&s)[0], "pinned");

        // A reload keeps the pin.
        w.write_config(&format!("# edited\n{config}"));
        assert!(d.call(Request::Reload).await.ok);
        for n in 1..=3 {
            w.web().lock().cpu.insert(format!("i{n}"), 5.0);
        }
        sleep(Duration::from_secs(30)).await;
        let s = all_ready(&d, 3).await;
        assert_eq!(s.scaling[0].hold.as_ref().map(|h| h.mode.as_str()), Some("pinned"));
        assert_eq!(s.scaling[0].desired, 3);
        // What the rule acts on, as numbers.
        let m = &s.scaling[0].metrics[..];
        assert_eq!(m.len(), 1, "{m:?}");
        assert_eq!((m[0].metric.as_str(), m[0].rule.as_str(), m[0].target), ("cpu", "target", 50.0));
        assert_eq!(m[0].value, Some(5.0));

        // Paused where it is, then handed back: the policy goes down to one.
        assert!(d.call(Request::PauseScaling { service: "web".into() }).await.ok);
        let s = d.status().await;
        assert_eq!(s.scaling[0].hold.as_ref().map(|h| (h.mode.as_str(), h.replicas)), Some(("paused", 3)));
        let r = d.call(Request::ResumeScaling { service: "web".into() }).await;
        assert_eq!(r.message.as_deref(), Some("web: scaling resumed; the policy decides again (was paused at 3)"));
        let s = d
            .until(Duration::from_secs(120), "the policy scales down", |s| {
                s.scaling[0].desired == 1 && s.scaling[0].hold.is_none()
            })
            .await;
        assert!(has_event(&s, "web: scale 3 -> "), "{:#?}", s.events);
        assert!(!rules(&s)[0].starts_with("p"), "{:?}", rules(&s));
    })
    .await;
}

/// The weight of `addr` in the status, with its run-time note.
fn weight_of(s: &Snapshot, addr: &str) -> (u32, Option<String>) {
    let b = s.services[0].backends.iter().find(|b| b.address == addr).expect("listed");
    (b.weight, b.run_time.clone())
}

#[tokio::test(start_paused = true)]
async fn run_time_changes_survive_reloads_until_reset() {
    let three = ["10.1.0.1:80", "10.1.0.2:80", "10.1.0.3:80"];
    let w = &World::new(&web("", &three));
    w.run(|d| async move {
        let set = Request::SetWeight { service: "web".into(), address: "10.1.0.3:80".parse().unwrap(), weight: 2 };
        assert!(d.call(set).await.ok);
        let add = Request::AddBackend { service: "web".into(), address: "10.1.0.9:80".parse().unwrap(), weight: 1 };
        assert!(d.call(add).await.ok);
        // Unchanged file: said so, with what is kept.
        let r = d.call(Request::Reload).await;
        assert_eq!(
            r.message.as_deref(),
            Some("config unchanged (api); 2 run-time change(s) kept, see `lb-agent config dump`")
        );
        // SIGHUP says the same, in the events.
        d._hangups.send(()).await.unwrap();
        d.until(Duration::from_secs(2), "SIGHUP event", |s| has_event(s, "config unchanged (SIGHUP); 2 run-time"))
            .await;
        // An unrelated edit: the weight and the added backend stay.
        w.write_config(&web("drain_timeout = \"5s\"", &three));
        let r = d.call(Request::Reload).await;
        assert_eq!(
            r.message.as_deref(),
            Some("config applied (api): no backend changed; 2 run-time change(s) kept, see `lb-agent config dump`")
        );
        let s = d.status().await;
        assert_eq!(weight_of(&s, "10.1.0.3:80"), (2, Some("weight 2, file says 1".into())));
        assert_eq!(weight_of(&s, "10.1.0.9:80"), (1, Some("added with weight 1, not in the file".into())));
        assert!(has_event(&s, "config applied (api): no backend changed; 2 run-time"), "{:#?}", s.events);
        // The dump is the effective config, as TOML that parses.
        let dump = d.call(Request::DumpConfig).await.message.unwrap();
        assert!(dump.contains("weight = 2 # run-time: weight 2, file says 1"), "{dump}");
        let dumped = Config::parse(&dump, std::path::Path::new("dump.toml")).unwrap();
        let weights: Vec<u32> = dumped.services[0].backends.iter().map(|b| b.weight).collect();
        assert_eq!(weights, [1, 1, 2, 1]);
        // Reset one backend: the file's weight applies again, slots move.
        let reset = |address: Option<&str>| Request::ResetBackends {
            service: "web".into(),
            address: address.map(|a| a.parse().unwrap()),
        };
        let r = d.call(reset(Some("10.1.0.3:80"))).await;
        let msg = r.message.unwrap_or_else(|| r.error.unwrap());
        assert!(msg.starts_with("reset web: 1 run-time change(s) dropped"), "{msg}");
        assert!(
            msg.contains("web: reweighted 10.1.0.3:80 2 -> 1, ") && msg.contains("slot(s) moved; 1 run-time"),
            "{msg}"
        );
        assert!(!msg.contains(" 0 slot(s) moved"), "{msg}");
        assert_eq!(weight_of(&d.status().await, "10.1.0.3:80"), (1, None));
        let r = d.call(reset(Some("10.1.0.3:80"))).await;
        assert_eq!(
            r.error.as_deref(),
            Some("web: no run-time change for 10.1.0.3:80 to reset (see `lb-agent config dump`)")
        );
        // The file comes to list the added backend as it runs: redundant, dropped.
        w.write_config(&web("drain_timeout = \"5s\"", &["10.1.0.1:80", "10.1.0.2:80", "10.1.0.3:80", "10.1.0.9:80"]));
        let r = d.call(Request::Reload).await;
        assert_eq!(
            r.message.as_deref(),
            Some(
                "config applied (api): web: 0 slot(s) moved, 1 run-time change(s) dropped: the file now says the same"
            )
        );
        assert_eq!(weight_of(&d.status().await, "10.1.0.9:80"), (1, None));
    })
    .await;
}

/// A backend routed out of an interface the service does not list cannot
/// be added, and one whose route moves there at run time is flagged
/// `unroutable` and leaves the table until the route comes back.
#[tokio::test(start_paused = true)]
async fn backends_the_host_routes_elsewhere_are_refused_or_flagged() {
    let w = &World::new(&web("", &["10.1.0.1:80", "10.1.0.2:80"]));
    let addr = |s: &str| -> SocketAddr { s.parse().unwrap() };
    let route = |a: &str, r: Route| w.dp.lock().routes.insert(crate::core::vip::ipv4(addr(a).ip()).unwrap(), r);
    route("10.1.0.1:80", Route::Via("eth0".into()));
    route("10.1.0.2:80", Route::Via("eth0".into()));
    route("10.1.0.3:80", Route::Via("eth9".into()));
    w.run(|d| async move {
        let add = |a: &str| Request::AddBackend { service: "web".into(), address: addr(a), weight: 2 };
        let r = d.call(add("10.1.0.3:80")).await;
        let e = r.error.unwrap_or_default();
        assert!(!r.ok && e.contains("backend 10.1.0.3:80 cannot be served: its route leaves by eth9"), "{e}");
        assert!(e.contains("service's interfaces (eth0)"), "{e}");
        let r = d.call(add("127.0.0.1:8080")).await;
        assert!(!r.ok && r.error.unwrap_or_default().contains("loopback"));
        let listed = |s: &Snapshot| -> Vec<(String, String, bool)> {
            s.services[0].backends.iter().map(|b| (b.address.clone(), b.state.clone(), b.in_table)).collect()
        };
        let s = d.status().await;
        assert_eq!(
            listed(&s),
            [("10.1.0.1:80".into(), "active".into(), true), ("10.1.0.2:80".into(), "active".into(), true)]
        );

        route("10.1.0.2:80", Route::Via("eth9".into()));
        let s = d.until(Duration::from_secs(2), "flagged", |s| s.services[0].backends[1].state == "unroutable").await;
        let b = &s.services[0].backends[1];
        assert!(!b.in_table && b.table_share == 0.0, "{b:?}");
        assert!(b.reason.as_deref().unwrap_or_default().starts_with("its route leaves by eth9"), "{b:?}");
        assert!(has_event(&s, "web: 10.1.0.2:80 unroutable (its route leaves by eth9"), "{:?}", s.events);
        assert!(s.render_table().contains("10.1.0.2:80 unroutable: its route leaves by eth9"));
        assert!(!w.dp.in_table(addr("10.1.0.2:80")));
        let table = s.render_table();
        let (header, reason) = (table.find("BACKEND").unwrap(), table.find("10.1.0.2:80 unroutable:").unwrap());
        assert!(header < reason, "the reason goes under the table:\n{table}");

        // A reload while it is flagged: an unrelated edit is taken, and the
        // backend stays flagged and out of the table...
        w.write_config(&web("drain_timeout = \"5s\"", &["10.1.0.1:80", "10.1.0.2:80"]));
        let r = d.call(Request::Reload).await;
        assert!(r.ok, "{r:?}");
        let s = d.status().await;
        assert_eq!(s.services[0].backends[1].state, "unroutable");
        assert!(!w.dp.in_table(addr("10.1.0.2:80")));
        // ...but a new backend the host routes elsewhere is refused.
        w.write_config(&web("drain_timeout = \"5s\"", &["10.1.0.1:80", "10.1.0.2:80", "10.1.0.3:80"]));
        let r = d.call(Request::Reload).await;
        assert!(!r.ok && r.error.unwrap_or_default().contains("10.1.0.3:80: its route leaves by eth9"));

        route("10.1.0.2:80", Route::Via("eth0".into()));
        let s = d.until(Duration::from_secs(2), "back", |s| s.services[0].backends[1].state == "active").await;
        assert!(s.services[0].backends[1].in_table && s.services[0].backends[1].reason.is_none());
        assert!(w.dp.in_table(addr("10.1.0.2:80")));
    })
    .await;
}

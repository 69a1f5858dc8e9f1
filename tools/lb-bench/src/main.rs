//! lb-bench: what `xdp_lb` costs per packet, measured with BPF_PROG_TEST_RUN.
//!
//! With `repeat`, the kernel runs a program again and again on one buffer
//! without restoring it, so after a rewrite every later run would time the
//! path of an already rewritten packet. Packets that get rewritten therefore
//! go through `xdp_bench`, which copies the frame back from `BENCH_FRAME`
//! (and, for new flows, makes the source unique) before tail-calling the
//! program under test; `xdp_bench -> xdp_pass` measures that wrapper, and is
//! subtracted. Every round proves its path: the reason counter of the
//! intended path (and `new_flows`) must move by exactly the repeat count.
//!
//! Before the first `xdp_lb` case the connection table is filled to its
//! size with new flows, so every case runs against a full table, as on a
//! busy host: lookups walk full buckets and each new flow evicts an old one.
//! Each case's cost is also given as a multiple of the established packet's
//! (net ns over net ns).
//!
//! The full-NAT cases use a second service (`mode = "full-nat"`): an
//! established packet, whose flow's port claim is checked on the way, and
//! a new flow's SYN, which also claims a port. Every new full-NAT flow
//! holds its port, so that case runs at most `FULL_NAT_SYN_RUNS` times a
//! round, from no claims, and proves its path by the claims it left too.
//!
//! The IPv6 cases (`ipv6`) run `xdp_lb` on IPv6 frames: the tail call to
//! `xdp_lb6` is part of what they measure, and for full NAT the second
//! one, to `xdp_fullnat6`, too. The `dsr-ipip` cases (IPv4 and IPv6)
//! arrive on an interface of the bench's own namespace whose backends have
//! neighbour entries, so the FIB lookup answers and every run leaves by
//! XDP_TX.
//!
//! Run as root: `cargo xtask bench [-- --repeat N --rounds R --json]`.

mod ipv6;

use std::{
    io::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
};

use anyhow::{bail, ensure, Context as _, Result};
use aya::maps::{Array, MapData, ProgramArray};
use clap::Parser;
use lb_agent::adapters::dataplane::netdev::if_index;
use lb_common::{
    hash::flow_hash, snat, BenchFrame, Reason, BENCH_FRAME, BENCH_FRAME_LEN, BENCH_F_NEW_FLOW, BENCH_TARGET,
    MODE_DSR_IPIP, PROG_BENCH, PROG_LB, PROG_LB_LOCAL, PROG_PASS,
};
use lb_lab::{
    command::run_cmd,
    netns::NetNsGuard,
    packet::{ipip_encapsulated, pad_to, tcp_frame, Ipv4, Mac, Tcp, IPPROTO_TCP, TCP_ACK, TCP_PSH, TCP_SYN},
    root::is_root,
    testrun::{
        check_reason_delta, test_run, test_run_repeat_from, LbObject, Run, ServiceSpec, XDP_DROP, XDP_PASS, XDP_TX,
    },
};
use serde::Serialize;

#[derive(Parser)]
#[command(about = "Time xdp_lb per packet with BPF_PROG_TEST_RUN (needs root)")]
struct Cli {
    /// Runs per measurement (the kernel reports the mean time per run).
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u32).range(1..))]
    repeat: u32,
    /// Measurements per case; the median is reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Leave the connection table as the cases fill it (nearly empty for
    /// all but the new-flow case), to compare with the full-table figures.
    #[arg(long)]
    no_fill: bool,
}

// ---- The setup ----------------------------------------------------------------

const LB_MAC: Mac = [0x02, 0, 0, 0, 0, 0x01];
const PEER_MAC: Mac = [0x02, 0, 0, 0, 0, 0x02];
const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 100), 80);
const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 168, 1, 10), 40000);
const NOT_A_VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 22);
/// Where new flows come from: the wrapper overwrites the low half of the
/// address and the port per run, and 172.16/16 keeps them clear of CLIENT.
const NEW_FLOW_CLIENTS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(172, 16, 0, 0), 1);

/// One TCP service with four backends, so a new flow does a real Maglev
/// pick.
fn service() -> ServiceSpec {
    let backends: Vec<(u32, SocketAddrV4)> =
        (1..=4).map(|i| (i, SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, i as u8), 8080))).collect();
    ServiceSpec::new(0, VIP, IPPROTO_TCP, 0, &backends)
}

/// A `dsr-ipip` service: its packets leave encapsulated to the backend,
/// out of `DSR_IFACE`, an interface of the bench's own namespace whose
/// backends have neighbour entries, so that the FIB lookup succeeds.
const DSR_VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 102), 80);
const DSR_IFACE: &str = "bench0";
const DSR_IFACE_MAC: Mac = [0x02, 0, 0, 0, 0x01, 0x01];
/// The outer source: the load balancer's address on `DSR_IFACE`.
const DSR_SOURCE: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 254);
const DSR_BACKEND_MAC: Mac = [0x02, 0, 0, 0, 0, 0x03];

fn dsr_service() -> ServiceSpec {
    let backends: Vec<(u32, SocketAddrV4)> =
        (9..=12).map(|i| (i, SocketAddrV4::new(Ipv4Addr::new(10, 2, 0, i as u8), 80))).collect();
    ServiceSpec::new(2, DSR_VIP, IPPROTO_TCP, 0, &backends)
}

/// The same again in full NAT, at its own VIP with its own four backends,
/// sent from `FULL_NAT_SOURCE` with ports from `FULL_NAT_PORTS`.
fn full_nat_service() -> ServiceSpec {
    let backends: Vec<(u32, SocketAddrV4)> =
        (5..=8).map(|i| (i, SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, i as u8), 8080))).collect();
    ServiceSpec::new(1, FULL_NAT_VIP, IPPROTO_TCP, 0, &backends).full_nat(FULL_NAT_SOURCE)
}

const FULL_NAT_VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 101), 80);
const FULL_NAT_SOURCE: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 254);
/// Every unprivileged port, so each backend takes 64,512 flows at once.
const FULL_NAT_PORTS: (u16, u16) = (1024, 65535);
/// Runs of the full-NAT SYN case: every run holds a port, and a quarter of
/// the four backends' 258,048 keeps the probe for a free one short.
const FULL_NAT_SYN_RUNS: u32 = 64_000;

/// Where the established full-NAT flow of `CLIENT` leaves from: the first
/// port its hash names (no claim holds it when that case runs).
fn full_nat_source() -> SocketAddrV4 {
    let hash = flow_hash(be(CLIENT), be(FULL_NAT_VIP), CLIENT.port().to_be(), FULL_NAT_VIP.port().to_be(), IPPROTO_TCP);
    SocketAddrV4::new(FULL_NAT_SOURCE, snat::candidate(hash, 0, FULL_NAT_PORTS.0, FULL_NAT_PORTS.1))
}

fn be(addr: SocketAddrV4) -> u32 {
    u32::from(*addr.ip()).to_be()
}

/// A TCP frame padded to exactly `BENCH_FRAME_LEN`, the length the wrapper
/// restores.
fn frame(src: SocketAddrV4, dst: SocketAddrV4, flags: u8, payload: &[u8]) -> Vec<u8> {
    let ip = Ipv4::new(*src.ip(), *dst.ip(), IPPROTO_TCP);
    let f = tcp_frame((LB_MAC, PEER_MAC), &ip, &Tcp::new(src.port(), dst.port(), flags).with_payload(payload));
    pad_to(f, BENCH_FRAME_LEN)
}

/// What a case runs and how it proves it took the intended path.
struct Case {
    name: &'static str,
    /// The program BPF_PROG_TEST_RUN runs.
    prog: &'static str,
    /// For `xdp_bench`: the program it tail-calls.
    target: Option<&'static str>,
    /// The frame every run starts from.
    frame: Vec<u8>,
    flags: u32,
    /// A frame sent through `xdp_lb` once before each round: the SYN that
    /// opens the flow the case then measures.
    prepare: Option<Vec<u8>>,
    /// The reason counter every run must bump; `None`: no counter may move.
    reason: Option<Reason>,
    /// `new_flows` added per run.
    new_flows_per_run: u64,
    /// The frame the last run must leave, when it is known.
    output: Option<Vec<u8>>,
    /// Subtracted in the "net" column.
    baseline: Baseline,
    /// `Settings::non_syn_flows_per_sec` while the case runs.
    non_syn_budget: u32,
    /// What every run must return.
    verdict: u32,
    /// At most this many runs per measurement (full NAT's new flows each
    /// hold a port); `u32::MAX`: `--repeat`.
    max_runs: u32,
    /// Full-NAT claims each run adds (checked after a round that starts
    /// with none: the claims are cleared first when this is above 0).
    claims_per_run: u64,
    /// Arrive on `DSR_IFACE` rather than on the namespace's loopback.
    on_dsr_iface: bool,
}

#[derive(Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Baseline {
    /// This case is a baseline itself.
    None,
    /// The empty program alone.
    Pass,
    /// The wrapper tail-calling the empty program.
    WrapperPass,
}

const CASE_PASS: &str = "xdp_pass alone (empty program)";
const CASE_WRAPPER: &str = "xdp_bench -> xdp_pass (wrapper)";
const CASE_ESTABLISHED: &str = "xdp_lb: established flow";

fn syn() -> Vec<u8> {
    frame(CLIENT, VIP, TCP_SYN, &[])
}

fn new_flow_syn() -> Vec<u8> {
    frame(NEW_FLOW_CLIENTS, VIP, TCP_SYN, &[])
}

fn new_flow_ack() -> Vec<u8> {
    frame(NEW_FLOW_CLIENTS, VIP, TCP_ACK, &[])
}

fn established() -> Vec<u8> {
    frame(CLIENT, VIP, TCP_ACK | TCP_PSH, b"bench")
}

fn reply() -> Vec<u8> {
    let (_, backend) = picked_backend();
    frame(backend, CLIENT, TCP_ACK | TCP_PSH, b"bench")
}

fn not_a_vip() -> Vec<u8> {
    frame(CLIENT, NOT_A_VIP, TCP_ACK, &[])
}

fn picked_backend() -> (u32, SocketAddrV4) {
    service().pick(CLIENT).expect("the table names a backend")
}

fn dsr_established() -> Vec<u8> {
    frame(CLIENT, DSR_VIP, TCP_ACK | TCP_PSH, b"bench")
}

fn cases() -> Vec<Case> {
    let (_, backend) = picked_backend();
    let dsr_backend = *dsr_service().pick(CLIENT).expect("the table names a backend").1.ip();
    let pass_only = |name, prog, target| Case {
        name,
        prog,
        target,
        frame: established(),
        flags: 0,
        prepare: None,
        reason: None,
        new_flows_per_run: 0,
        output: None,
        baseline: Baseline::None,
        non_syn_budget: u32::MAX,
        verdict: XDP_PASS,
        max_runs: u32::MAX,
        claims_per_run: 0,
        on_dsr_iface: false,
    };
    let wrapped = |name, frame, reason| Case {
        name,
        prog: PROG_BENCH,
        target: Some(PROG_LB),
        frame,
        flags: 0,
        prepare: Some(syn()),
        reason: Some(reason),
        new_flows_per_run: 0,
        output: None,
        baseline: Baseline::WrapperPass,
        non_syn_budget: u32::MAX,
        verdict: XDP_PASS,
        max_runs: u32::MAX,
        claims_per_run: 0,
        on_dsr_iface: false,
    };
    // A dsr-ipip case: in on `DSR_IFACE`, out by XDP_TX.
    let dsr = |name, frame| Case { verdict: XDP_TX, on_dsr_iface: true, ..wrapped(name, frame, Reason::Forwarded) };
    let full_nat_backend = full_nat_service().pick(CLIENT).expect("the full-NAT table names a backend").1;
    // Full NAT, in each family: an established packet, both ends
    // rewritten, whose flow's claim is checked on every packet; and a new
    // flow's SYN, which also claims a port (a BPF_NOEXIST insert) and
    // writes its entry twice. The claims go between rounds.
    let full_nat = |names: [&'static str; 2], syn: Vec<u8>, established: Vec<u8>, out: Vec<u8>, new: Vec<u8>| {
        [
            Case { prepare: Some(syn), output: Some(out), ..wrapped(names[0], established, Reason::Forwarded) },
            Case {
                flags: BENCH_F_NEW_FLOW,
                prepare: None,
                new_flows_per_run: 1,
                max_runs: FULL_NAT_SYN_RUNS,
                claims_per_run: 1,
                ..wrapped(names[1], new, Reason::Forwarded)
            },
        ]
    };
    let [fn4_established, fn4_syn] = full_nat(
        ["xdp_lb: full-nat established", "xdp_lb: full-nat SYN, full table"],
        frame(CLIENT, FULL_NAT_VIP, TCP_SYN, &[]),
        frame(CLIENT, FULL_NAT_VIP, TCP_ACK | TCP_PSH, b"bench"),
        frame(full_nat_source(), full_nat_backend, TCP_ACK | TCP_PSH, b"bench"),
        frame(NEW_FLOW_CLIENTS, FULL_NAT_VIP, TCP_SYN, &[]),
    );
    let [fn6_established, fn6_syn] = full_nat(
        ["xdp_lb -> xdp_fullnat6: established", "xdp_lb -> xdp_fullnat6: new-flow SYN"],
        ipv6::full_nat_syn(),
        ipv6::full_nat_established(),
        ipv6::full_nat_established_out(),
        ipv6::full_nat_new_flow_syn(),
    );
    vec![
        pass_only(CASE_PASS, PROG_PASS, None),
        pass_only(CASE_WRAPPER, PROG_BENCH, Some(PROG_PASS)),
        // No rewrite, so running it without the wrapper is honest.
        Case {
            output: Some(not_a_vip()),
            baseline: Baseline::Pass,
            prog: PROG_LB,
            target: None,
            prepare: None,
            ..wrapped("xdp_lb alone: not a VIP (no rewrite)", not_a_vip(), Reason::PassNoService)
        },
        Case {
            prepare: None,
            output: Some(not_a_vip()),
            ..wrapped("xdp_lb: not a VIP", not_a_vip(), Reason::PassNoService)
        },
        Case {
            output: Some(frame(CLIENT, backend, TCP_ACK | TCP_PSH, b"bench")),
            ..wrapped(CASE_ESTABLISHED, established(), Reason::Forwarded)
        },
        Case {
            output: Some(frame(VIP, CLIENT, TCP_ACK | TCP_PSH, b"bench")),
            ..wrapped("xdp_lb: backend reply", reply(), Reason::ReplyTranslated)
        },
        // The program for interfaces facing local stacks: the same paths
        // plus the partial-checksum test (the frames carry complete ones).
        Case {
            target: Some(PROG_LB_LOCAL),
            output: Some(frame(CLIENT, backend, TCP_ACK | TCP_PSH, b"bench")),
            ..wrapped("xdp_lb_local: established flow", established(), Reason::Forwarded)
        },
        Case {
            target: Some(PROG_LB_LOCAL),
            output: Some(frame(VIP, CLIENT, TCP_ACK | TCP_PSH, b"bench")),
            ..wrapped("xdp_lb_local: backend reply", reply(), Reason::ReplyTranslated)
        },
        // The table is full: every new flow inserts its one entry and
        // evicts an old one. The figure includes that.
        Case {
            flags: BENCH_F_NEW_FLOW,
            prepare: None,
            new_flows_per_run: 1,
            ..wrapped("xdp_lb: new-flow SYN, full table", new_flow_syn(), Reason::Forwarded)
        },
        // A segment other than a SYN whose flow the table does not hold:
        // within the budget it re-picks and inserts like a SYN...
        Case {
            flags: BENCH_F_NEW_FLOW,
            prepare: None,
            new_flows_per_run: 1,
            ..wrapped("xdp_lb: non-SYN miss, within budget", new_flow_ack(), Reason::Forwarded)
        },
        // ...beyond it, it is dropped without touching the table.
        Case {
            flags: BENCH_F_NEW_FLOW,
            prepare: None,
            non_syn_budget: 0,
            verdict: XDP_DROP,
            ..wrapped("xdp_lb: non-SYN miss, over budget", new_flow_ack(), Reason::DropNonSynOverBudget)
        },
        fn4_established,
        fn4_syn,
        // IPv6 (destination NAT): the tail call to xdp_lb6 included.
        Case {
            prepare: Some(ipv6::frame(ipv6::CLIENT, ipv6::VIP, TCP_SYN, &[])),
            output: Some(ipv6::established_out()),
            ..wrapped("xdp_lb -> xdp_lb6: ipv6 nat established", ipv6::established(), Reason::Forwarded)
        },
        // Its table is not filled first: each new flow inserts, evicting
        // only once CONNTRACK6 is full.
        Case {
            flags: BENCH_F_NEW_FLOW,
            prepare: None,
            new_flows_per_run: 1,
            ..wrapped("xdp_lb -> xdp_lb6: ipv6 nat new-flow SYN", ipv6::new_flow_syn(), Reason::Forwarded)
        },
        // IPv6 full NAT, as IPv4's: two tail calls (xdp_lb6, then
        // xdp_fullnat6); its claims sit in SNAT_FLOWS6.
        fn6_established,
        fn6_syn,
        // An established flow of a dsr-ipip service: the FIB lookup to the
        // backend, 20 bytes more at the head, the outer header, XDP_TX.
        Case {
            prepare: Some(frame(CLIENT, DSR_VIP, TCP_SYN, &[])),
            output: Some(ipip_encapsulated(
                &dsr_established(),
                (DSR_BACKEND_MAC, DSR_IFACE_MAC),
                DSR_SOURCE,
                dsr_backend,
            )),
            ..dsr("xdp_lb: dsr-ipip encapsulation", dsr_established())
        },
        // The same over IPv6: 40 bytes more, IPv6-in-IPv6...
        Case {
            prepare: Some(ipv6::frame(ipv6::CLIENT, ipv6::DSR_VIP, TCP_SYN, &[])),
            output: Some(ipv6::dsr_established_out()),
            ..dsr("xdp_lb -> xdp_lb6: ipv6 dsr-ipip established", ipv6::dsr_established())
        },
        // ...and a new flow's SYN, which picks and inserts as well (its
        // table not filled first, as for the IPv6 nat new flow).
        Case {
            flags: BENCH_F_NEW_FLOW,
            prepare: None,
            new_flows_per_run: 1,
            ..dsr("xdp_lb -> xdp_lb6: ipv6 dsr-ipip new-flow SYN", ipv6::dsr_new_flow_syn())
        },
    ]
}

// ---- Measuring ------------------------------------------------------------------

struct Bench {
    lb: LbObject,
    frames: Array<MapData, BenchFrame>,
    targets: ProgramArray<MapData>,
    backend_ids: Vec<u32>,
    dsr_ifindex: u32,
    /// The bench's own network namespace, for `DSR_IFACE`.
    _netns: NetNsGuard,
}

impl Bench {
    fn setup() -> Result<Self> {
        let netns = NetNsGuard::new().context("create the bench's network namespace")?;
        let mut lb = LbObject::load_bench()?;
        lb.load_program(PROG_PASS)?;
        lb.load_program(PROG_BENCH)?;
        let (svc, full_nat, dsr) = (service(), full_nat_service(), dsr_service());
        lb.add_service(&svc)?;
        lb.add_service(&full_nat)?;
        lb.set_snat_ports(FULL_NAT_PORTS.0, FULL_NAT_PORTS.1)?;
        let (v6, dsr6, full_nat6) = (ipv6::service(), ipv6::dsr_service(), ipv6::full_nat_service());
        lb.add_service6(&v6)?;
        lb.add_service6(&full_nat6)?;
        lb.add_service(&dsr)?;
        lb.write_service(&dsr, MODE_DSR_IPIP, DSR_SOURCE)?;
        lb.add_service6(&dsr6)?;
        lb.write_service6(&dsr6, MODE_DSR_IPIP, ipv6::DSR_SOURCE)?;
        let dsr_backends = dsr.backends.iter().map(|(_, b)| IpAddr::V4(*b.ip()));
        let dsr_ifindex = wire_dsr_iface(dsr_backends.chain(dsr6.backends.iter().map(|(_, b)| IpAddr::V6(*b.ip()))))?;
        lb.allow_egress(dsr_ifindex)?;
        Ok(Self {
            frames: lb.take_map(BENCH_FRAME)?,
            targets: lb.take_map(BENCH_TARGET)?,
            backend_ids: svc
                .backends
                .iter()
                .chain(&full_nat.backends)
                .chain(&dsr.backends)
                .map(|(id, _)| *id)
                .chain(v6.backends.iter().chain(&dsr6.backends).chain(&full_nat6.backends).map(|(id, _)| *id))
                .collect(),
            dsr_ifindex,
            lb,
            _netns: netns,
        })
    }

    /// Points the wrapper at `target` and the frame it restores.
    fn aim(&mut self, target: &str, frame: &[u8], flags: u32) -> Result<()> {
        let bytes: [u8; BENCH_FRAME_LEN] = frame.try_into().context("bench frames are BENCH_FRAME_LEN bytes")?;
        self.frames.set(0, BenchFrame { bytes, flags, _pad: 0 }, 0).context("write BENCH_FRAME")?;
        let fd = self.lb.program(target)?.fd().with_context(|| format!("fd of {target}"))?;
        self.targets.set(0, fd, 0).with_context(|| format!("put {target} into BENCH_TARGET"))
    }

    /// Fills the connection table with new flows, as many as it holds,
    /// through the program itself; returns the entries it then has.
    fn fill_table(&mut self) -> Result<(u32, u64)> {
        let size = self.lb.conntrack_max_entries()?;
        self.aim(PROG_LB, &new_flow_syn(), BENCH_F_NEW_FLOW)?;
        let (reasons, flows) = (self.lb.reasons()?, self.new_flows()?);
        let run = test_run(self.lb.program(PROG_BENCH)?, &new_flow_syn(), size).context("fill the connection table")?;
        ensure!(run.verdict == XDP_PASS, "filling the table: verdict {}", run.verdict);
        check_reason_delta(&reasons, &self.lb.reasons()?, Reason::Forwarded, u64::from(size))?;
        ensure!(self.new_flows()? - flows == u64::from(size), "filling the table: new_flows did not move by {size}");
        Ok((size, self.lb.conntrack_len()?))
    }

    fn new_flows(&self) -> Result<u64> {
        let mut total = 0;
        for id in &self.backend_ids {
            total += self.lb.backend_counters(*id)?.new_flows;
        }
        Ok(total)
    }

    /// One measured run of `case`, checked against its proof.
    fn measure_round(&mut self, case: &Case, repeat: u32) -> Result<u32> {
        let repeat = repeat.min(case.max_runs);
        if case.claims_per_run > 0 {
            self.lb.clear_snat_claims()?;
        }
        if let Some(target) = case.target {
            self.aim(target, &case.frame, case.flags)?;
        }
        self.lb.set_non_syn_flows_per_sec(case.non_syn_budget)?;
        if let Some(syn) = &case.prepare {
            let (run, sent) = if case.on_dsr_iface {
                (self.lb.run_from(PROG_LB, syn, self.dsr_ifindex)?, XDP_TX)
            } else {
                (self.lb.run(PROG_LB, syn)?, XDP_PASS)
            };
            ensure!(run.verdict == sent, "the SYN that opens the flow got verdict {}", run.verdict);
        }
        let (reasons, flows) = (self.lb.reasons()?, self.new_flows()?);
        let prog = self.lb.program(case.prog)?;
        let run = if case.on_dsr_iface {
            test_run_repeat_from(prog, &case.frame, repeat, self.dsr_ifindex)
        } else {
            test_run(prog, &case.frame, repeat)
        }
        .with_context(|| format!("BPF_PROG_TEST_RUN {}", case.prog))?;
        self.check_path(case, &run, repeat, &reasons, flows)?;
        u32::try_from(run.duration.as_nanos()).context("duration out of range")
    }

    /// Fails unless every one of the `repeat` runs took the case's path.
    fn check_path(&self, case: &Case, run: &Run, repeat: u32, reasons: &[u64], flows: u64) -> Result<()> {
        ensure!(
            run.verdict == case.verdict,
            "verdict {} instead of {} (a failed tail call returns XDP_ABORTED)",
            run.verdict,
            case.verdict
        );
        let after = self.lb.reasons()?;
        match case.reason {
            Some(reason) => check_reason_delta(reasons, &after, reason, u64::from(repeat))?,
            None => ensure!(after == reasons, "REASON_STATS moved, but xdp_lb should not have run"),
        }
        let new_flows = self.new_flows()? - flows;
        let want = case.new_flows_per_run * u64::from(repeat);
        ensure!(new_flows == want, "new_flows moved by {new_flows}, want {want}");
        if let Some(out) = &case.output {
            ensure!(&run.data == out, "the last run left an unexpected frame");
        }
        if case.claims_per_run > 0 {
            let claims = (self.lb.snat_claims()?.len() + self.lb.snat_claims6()?.len()) as u64;
            let want = case.claims_per_run * u64::from(repeat);
            ensure!(claims == want, "full NAT holds {claims} ports, want {want}");
        }
        Ok(())
    }
}

/// One case's result, as printed.
#[derive(Serialize)]
struct Row {
    case: &'static str,
    program: &'static str,
    tail_call: Option<&'static str>,
    /// Median of the rounds.
    ns_per_packet: u32,
    rounds_ns: Vec<u32>,
    baseline: Baseline,
    /// `ns_per_packet` minus the baseline's, when it has one.
    net_ns: Option<i64>,
    /// `ns_per_packet` over the empty program's.
    vs_pass: f64,
    /// `net_ns` over the established packet's (wrapped `xdp_lb` cases).
    vs_established: Option<f64>,
    /// The counter every run bumped (the path proof).
    reason: Option<&'static str>,
    repeat: u32,
}

/// The JSON document `--json` prints.
#[derive(Serialize)]
struct Report {
    repeat: u32,
    rounds: u32,
    /// The connection table's size, and the entries it held once filled.
    table_size: u32,
    table_entries_after_fill: u64,
    cases: Vec<Row>,
}

/// `DSR_IFACE` (a veth whose peer stays here) with `DSR_SOURCE`/24 and
/// `ipv6::DSR_SOURCE`/64, forwarding on in both families, and a neighbour
/// entry for each of the dsr services' `backends`; returns its ifindex.
fn wire_dsr_iface(backends: impl Iterator<Item = IpAddr>) -> Result<u32> {
    let mac = |m: Mac| m.map(|b| format!("{b:02x}")).join(":");
    let peer = format!("{DSR_IFACE}p");
    run_cmd("ip", &["link", "add", DSR_IFACE, "address", &mac(DSR_IFACE_MAC), "type", "veth", "peer", "name", &peer]);
    run_cmd("ip", &["link", "set", &peer, "up"]);
    run_cmd("ip", &["link", "set", DSR_IFACE, "up"]);
    run_cmd("ip", &["addr", "add", &format!("{DSR_SOURCE}/24"), "dev", DSR_IFACE]);
    // No duplicate address detection: usable at once.
    run_cmd("ip", &["addr", "add", &format!("{}/64", ipv6::DSR_SOURCE), "dev", DSR_IFACE, "nodad"]);
    // A child process opens /proc/sys in the namespace of the thread that
    // spawned it: this one.
    run_cmd("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
    run_cmd("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]);
    for b in backends {
        let ip = b.to_string();
        run_cmd(
            "ip",
            &["neigh", "replace", &ip, "lladdr", &mac(DSR_BACKEND_MAC), "dev", DSR_IFACE, "nud", "permanent"],
        );
    }
    if_index(DSR_IFACE).with_context(|| format!("no {DSR_IFACE} in the bench's namespace"))
}

fn measure(bench: &mut Bench, case: &Case, cli: &Cli) -> Result<Vec<u32>> {
    let mut rounds = Vec::new();
    for r in 0..cli.rounds {
        let ns = bench
            .measure_round(case, cli.repeat)
            .with_context(|| format!("case \"{}\", round {}", case.name, r + 1))?;
        eprintln!("[bench] {:<40} round {}/{}: {ns} ns", case.name, r + 1, cli.rounds);
        rounds.push(ns);
    }
    Ok(rounds)
}

fn median(v: &[u32]) -> u32 {
    let mut s = v.to_vec();
    s.sort_unstable();
    s[s.len() / 2]
}

fn rows(cases: &[Case], measured: &[Vec<u32>], repeat: u32) -> Result<Vec<Row>> {
    let find = |name| {
        let i = cases.iter().position(|c| c.name == name).context("baseline case missing")?;
        anyhow::Ok(median(&measured[i]))
    };
    let (pass, wrapper) = (find(CASE_PASS)?, find(CASE_WRAPPER)?);
    let established = i64::from(find(CASE_ESTABLISHED)?) - i64::from(wrapper);
    Ok(cases
        .iter()
        .zip(measured)
        .map(|(c, ns)| {
            let med = median(ns);
            let base = match c.baseline {
                Baseline::None => None,
                Baseline::Pass => Some(pass),
                Baseline::WrapperPass => Some(wrapper),
            };
            let net_ns = base.map(|b| i64::from(med) - i64::from(b));
            let wrapped_lb = c.baseline == Baseline::WrapperPass && c.target == Some(PROG_LB);
            Row {
                vs_established: net_ns.filter(|_| wrapped_lb).map(|n| n as f64 / established.max(1) as f64),
                case: c.name,
                program: c.prog,
                tail_call: c.target,
                ns_per_packet: med,
                rounds_ns: ns.clone(),
                baseline: c.baseline,
                net_ns,
                vs_pass: f64::from(med) / f64::from(pass.max(1)),
                reason: c.reason.map(Reason::name),
                repeat: repeat.min(c.max_runs),
            }
        })
        .collect())
}

// ---- Output -----------------------------------------------------------------------

fn print_table(report: &Report) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "BPF_PROG_TEST_RUN, {} runs x {} rounds per case, median ns per packet (kernel-reported)",
        report.repeat, report.rounds
    )?;
    writeln!(
        out,
        "connection table filled first: {} entries of {} before the xdp_lb cases",
        report.table_entries_after_fill, report.table_size
    )?;
    writeln!(
        out,
        "{:<44} {:>8} {:>8} {:>8} {:>8}  path proof (every run)",
        "case", "ns/pkt", "net ns", "x pass", "x est"
    )?;
    for r in &report.cases {
        let net = r.net_ns.map_or("-".to_owned(), |n| n.to_string());
        let est = r.vs_established.map_or("-".to_owned(), |x| format!("{x:.2}x"));
        let proof = r.reason.map_or("XDP_PASS, no counter moved".to_owned(), |n| format!("{n} +{}", r.repeat));
        writeln!(out, "{:<44} {:>8} {:>8} {:>7.2}x {:>8}  {proof}", r.case, r.ns_per_packet, net, r.vs_pass, est)?;
    }
    writeln!(out, "net ns: minus `{CASE_WRAPPER}` for wrapped cases, minus `{CASE_PASS}` for xdp_lb alone.")?;
    writeln!(out, "x est: net ns over `{CASE_ESTABLISHED}`'s net ns.")?;
    Ok(())
}

/// Pins this thread to the CPU it is on. The wrapper numbers new flows with
/// a per-CPU counter, and a long test run can migrate when it yields to the
/// scheduler; on another CPU the counter would repeat flows already made.
/// One CPU also keeps the figures steadier.
fn pin_to_current_cpu() -> Result<usize> {
    // SAFETY: no preconditions.
    let cpu = unsafe { libc::sched_getcpu() };
    let cpu = usize::try_from(cpu).map_err(|_| std::io::Error::last_os_error()).context("sched_getcpu")?;
    // SAFETY: an all-zero cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` came from the kernel, so it is below CPU_SETSIZE; pid 0
    // is this thread and `set` is as large as the size passed.
    let rc = unsafe {
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("sched_setaffinity");
    }
    Ok(cpu)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if !is_root() {
        bail!("lb-bench needs root: BPF_PROG_TEST_RUN needs CAP_BPF and CAP_SYS_ADMIN (try `sudo cargo xtask bench`)");
    }
    let cpu = pin_to_current_cpu()?;
    eprintln!("[bench] pinned to CPU {cpu}; loading lb-ebpf and filling the Maglev table");
    let mut bench = Bench::setup()?;
    let cases = cases();
    let mut measured = Vec::new();
    let mut fill = None;
    for case in &cases {
        if fill.is_none() && case.baseline != Baseline::None {
            let (size, entries) = if cli.no_fill { (0, 0) } else { bench.fill_table()? };
            eprintln!("[bench] connection table filled: {entries} entries of {size}");
            fill = Some((size, entries));
        }
        measured.push(measure(&mut bench, case, &cli)?);
    }
    let (table_size, table_entries_after_fill) = fill.context("no xdp_lb case")?;
    let cases = rows(&cases, &measured, cli.repeat)?;
    let report = Report { repeat: cli.repeat, rounds: cli.rounds, table_size, table_entries_after_fill, cases };
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        Ok(())
    } else {
        print_table(&report)
    }
}

//! `cargo xtask test`: setup, unit tests, root tests, then the fixtures
//! and e2e_netns again on an older kernel in a VM; or with `--kernel`, only
//! the VM stage, on the kernels named.

use std::env;
use std::fs;
use std::path::PathBuf;
use std::process::{Command, ExitCode, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::util::{self, describe, paint, secs, stream, Step, BOLD, GREEN, RED, YELLOW};
use crate::{setup, vm};

#[derive(Args)]
pub struct Options {
    /// Run only the unit tests (no root needed) and skip the root tests.
    #[arg(long)]
    unit_only: bool,

    /// Run only the VM stage, on these Debian kernels (6.1: bookworm,
    /// 6.12: trixie), e.g. `--kernel 6.1,6.12`.
    #[arg(long, value_name = "VERSION", value_delimiter = ',', conflicts_with_all = ["unit_only", "no_vm"])]
    kernel: Vec<String>,

    /// Skip the VM stage (for local runs; CI=true refuses it).
    #[arg(long)]
    no_vm: bool,

    /// Run only tests whose names contain FILTER (in every stage).
    #[arg(value_name = "FILTER")]
    filter: Option<String>,
}

struct Stage {
    name: String,
    color: &'static str,
    outcome: String,
    took: Duration,
    ok: bool,
}

/// Packages with tests that need root: lb-tests holds nothing else; the lab
/// and lb-load have a few `root_` unit tests beside plain ones, which
/// therefore run in both stages.
const ROOT_PACKAGES: [&str; 3] = ["lb-tests", "lb-lab", "lb-load"];

/// lb-lab's `root::ROOT_STAGE_LATER` (xtask does not depend on the lab):
/// set for the unit stage, it makes root tests skip there.
const ROOT_STAGE_LATER: &str = "LB_ROOT_STAGE_LATER";

/// Root test files that measure CPU: e2e_scaling scales on it,
/// docker_orchestrator asserts a loaded container's share, bench_e2e
/// accounts it and backend_bin bounds the wall time of CPU work. They run
/// last, alone, after the VM stage.
const CPU_BOUND: [&str; 4] = ["backend_bin", "bench_e2e", "docker_orchestrator", "e2e_scaling"];

pub fn run(opts: &Options) -> Result<ExitCode> {
    if opts.no_vm && util::in_ci() {
        bail!("--no-vm is for local runs: CI=true runs the VM stage");
    }
    for kernel in &opts.kernel {
        vm::check_version(kernel)?;
    }
    setup::ensure_all(false)?;
    let filter: Vec<&str> = opts.filter.as_deref().into_iter().collect();
    let mut stages = Vec::new();
    if !opts.kernel.is_empty() {
        run_vm_stages(&opts.kernel, opts.filter.as_deref(), &mut stages);
        return Ok(summarise(&stages));
    }

    // Pure unit tests: no root, no kernel objects beyond building lb-ebpf.
    let mut unit = util::cargo();
    unit.args(["test", "--workspace", "--exclude", "lb-tests"]).args(&filter).env(ROOT_STAGE_LATER, "1");
    stages.push(run_stage("unit tests", &mut unit)?);
    if opts.filter.is_none() {
        stages.push(check_examples()?);
    } else {
        stages.push(skip_stage("examples", "skipped (FILTER given)", true));
    }

    if opts.unit_only {
        stages.push(skip_stage("root tests", "skipped (--unit-only)", true));
    } else if util::is_root()? {
        // The end-to-end tests run the real daemon, the demo backend, the
        // load generator and the e2e bench (its smoke test); the container
        // image needs the backend fully static (FROM scratch).
        let mut bins = util::release_bins();
        let mut static_backend = util::cargo();
        static_backend
            .args(["build", "--release", "-p", "lb-backend", "--target", "x86_64-unknown-linux-gnu"])
            .env("RUSTFLAGS", "-C target-feature=+crt-static");
        let mut root_build = root_tests();
        root_build.arg("--no-run");
        let mut ok = true;
        for (name, cmd) in [
            ("build lb-agent, lb-backend, lb-load, lb-bench-e2e (release)", &mut bins),
            ("build static lb-backend", &mut static_backend),
            ("build the root tests (release)", &mut root_build),
        ] {
            let stage = run_stage(name, cmd)?;
            ok &= stage.ok;
            stages.push(stage);
            if !ok {
                break;
            }
        }
        if ok {
            run_root_and_vm_stages(opts, &filter, &mut stages)?;
        }
    } else {
        let why = format!("SKIPPED: not root (uid {}); run as root, or pass --unit-only", util::euid()?);
        stages.push(skip_stage("root tests", &why, false));
    }

    Ok(summarise(&stages))
}

/// The root tests, and the VM stage beside them: most root tests wait on
/// daemons, Docker and timers more than they compute, so qemu's emulated
/// CPUs find room beside them and the stage's two minutes mostly vanish
/// from the run. The test files that measure CPU ([`CPU_BOUND`]) run after
/// the VM has finished. (Not niced: the VM's own tests, slow under
/// emulation, have the thinner margins.)
fn run_root_and_vm_stages(opts: &Options, filter: &[&str], stages: &mut Vec<Stage>) -> Result<()> {
    let (beside, alone) = root_test_files()?;
    let vm = if opts.no_vm { None } else { Some(BackgroundVm::start(&vm::DEFAULT_KERNELS, opts.filter.as_deref())) };
    // One thread: the tests create namespaces and attach programs, and
    // must not see each other's.
    let mut first = root_tests();
    first.args(["--lib", "--bins"]);
    for file in &beside {
        first.args(["--test", file]);
    }
    first.args(filter).args(["--", "--test-threads=1"]);
    let first = run_stage("root tests", &mut first);
    // Waited for even when the root tests could not start.
    let vm = match vm {
        None => skip_stage("vm", "skipped (--no-vm)", true),
        Some(Ok(vm)) => vm.finish(),
        Some(Err(e)) => skip_stage("vm", &format!("FAILED: {e:#}"), false),
    };
    // The VM's outcome reaches the summary even when the root tests could
    // not start.
    let first = match first {
        Ok(first) => first,
        Err(e) => {
            stages.push(vm);
            return Err(e);
        }
    };
    stages.push(first);
    stages.push(vm);
    let mut last = root_tests();
    for file in &alone {
        last.args(["--test", file]);
    }
    last.args(filter).args(["--", "--test-threads=1"]);
    stages.push(run_stage(&format!("root tests alone ({})", alone.join(", ")), &mut last)?);
    Ok(())
}

/// `cargo test --release` of the packages with root tests ([`ROOT_PACKAGES`]).
fn root_tests() -> Command {
    let mut root = util::cargo();
    root.args(["test", "--release"]);
    for package in ROOT_PACKAGES {
        root.args(["-p", package]);
    }
    root
}

/// lb-tests' test files (tests/tests/*.rs), by name: those that may run
/// beside the VM stage, then [`CPU_BOUND`].
fn root_test_files() -> Result<(Vec<String>, Vec<String>)> {
    let dir = util::workspace_root().join("tests").join("tests");
    let mut names = Vec::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry.with_context(|| format!("read {}", dir.display()))?.path();
        if path.extension().is_some_and(|x| x == "rs") {
            names.extend(path.file_stem().map(|s| s.to_string_lossy().into_owned()));
        }
    }
    names.sort();
    split_cpu_bound(names)
}

/// Splits test file names into (the others, [`CPU_BOUND`]); a name in
/// CPU_BOUND without its file is an error, not a test silently skipped.
fn split_cpu_bound(names: Vec<String>) -> Result<(Vec<String>, Vec<String>)> {
    if let Some(missing) = CPU_BOUND.iter().find(|c| !names.iter().any(|n| n == *c)) {
        bail!("xtask's CPU_BOUND names tests/tests/{missing}.rs, which does not exist");
    }
    Ok(names.into_iter().partition(|n| !CPU_BOUND.contains(&n.as_str())))
}

/// The VM stage as a child `xtask test --kernel ...`, its output in a file
/// that [`BackgroundVm::finish`] prints when the root tests are done.
struct BackgroundVm {
    name: String,
    out: PathBuf,
    step: Step,
    waiter: thread::JoinHandle<(std::io::Result<ExitStatus>, Duration)>,
}

impl BackgroundVm {
    fn start(kernels: &[&str], filter: Option<&str>) -> Result<Self> {
        let out = util::target_dir().join("vm").join("background.out");
        if let Some(dir) = out.parent() {
            fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        let file = fs::File::create(&out).with_context(|| format!("create {}", out.display()))?;
        let mut cmd = Command::new(env::current_exe().context("find xtask's own executable")?);
        cmd.args(["test", "--kernel", &kernels.join(",")])
            .args(filter)
            .stdin(Stdio::null())
            .stdout(file.try_clone().with_context(|| format!("open {}", out.display()))?)
            .stderr(file);
        let name = format!("vm kernel {} ({})", kernels.join(","), vm::TESTS.join(", "));
        let step = Step::new("test", name.clone());
        println!("  $ {}", util::show(&cmd));
        let mut child = cmd.spawn().context("start the VM stage (xtask test --kernel)")?;
        step.say(&format!("running beside the root tests, output in {}", out.display()));
        let started = Instant::now();
        let waiter = thread::spawn(move || (child.wait(), started.elapsed()));
        Ok(BackgroundVm { name, out, step, waiter })
    }

    /// Waits for the VM stage, prints its output and records it.
    fn finish(self) -> Stage {
        let (status, took) =
            self.waiter.join().unwrap_or_else(|_| (Err(std::io::Error::other("waiter panicked")), Duration::ZERO));
        let text = fs::read_to_string(&self.out).unwrap_or_default();
        // Indented: its own "[test] summary" is not the run's.
        for line in text.lines() {
            println!("  {line}");
        }
        let found = child_outcomes(&text);
        let (ok, outcome) = match status {
            Ok(s) if s.success() => (true, found.join("; ")),
            Ok(s) if found.is_empty() => (false, format!("FAILED: {}; output in {}", describe(s), self.out.display())),
            Ok(s) => {
                (false, format!("FAILED: {} ({}); output in {}", describe(s), found.join("; "), self.out.display()))
            }
            Err(e) => (false, format!("FAILED: wait for the VM stage: {e}")),
        };
        let color = if ok { GREEN } else { RED };
        self.step.finish(color, &outcome);
        Stage { name: self.name, color, outcome, took, ok }
    }
}

/// What the child's summary says of each of its VM stages, from its lines
/// "[test]   vm kernel 6.1 (fixtures, ...): OUTCOME (TOOK)".
fn child_outcomes(output: &str) -> Vec<&str> {
    output
        .lines()
        .filter_map(|l| l.strip_prefix("[test]   vm ")?.split_once("): ").map(|(_, outcome)| outcome))
        .collect()
}

fn summarise(stages: &[Stage]) -> ExitCode {
    println!("{}", paint(BOLD, "[test] summary"));
    for s in stages {
        println!("[test]   {}: {} ({})", s.name, paint(s.color, &s.outcome), secs(s.took));
    }
    if stages.iter().all(|s| s.ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// One stage per kernel: `fixtures` and `e2e_netns` in a VM booting it.
/// An error (no network for the download, say) fails that stage only.
fn run_vm_stages<S: AsRef<str>>(kernels: &[S], filter: Option<&str>, stages: &mut Vec<Stage>) {
    let build = Step::new("test", "build the VM stage's tests and lb-agent (release)");
    let payload = vm::build_payload();
    let took = build.elapsed();
    let payload = match payload {
        Ok(p) => p,
        Err(e) => {
            let outcome = format!("FAILED: {e:#}");
            build.finish(RED, &outcome);
            stages.push(Stage { name: "vm build".to_owned(), color: RED, outcome, took, ok: false });
            return;
        }
    };
    build.finish(GREEN, "built");
    for kernel in kernels {
        let kernel = kernel.as_ref();
        let name = format!("vm kernel {kernel} ({})", vm::TESTS.join(", "));
        let step = Step::new("test", name.clone());
        let (ok, color, outcome) = match vm::run(kernel, &payload, filter) {
            Ok(report) if report.passed => (true, GREEN, report.summary),
            Ok(report) => (false, RED, report.summary),
            Err(e) => (false, RED, format!("FAILED: {e:#}")),
        };
        let took = step.finish(color, &outcome);
        stages.push(Stage { name, color, outcome, took, ok });
    }
}

/// Runs one `cargo test` and records its outcome; a failing stage does not
/// stop the next one, so one run reports both.
fn run_stage(name: &str, cmd: &mut Command) -> Result<Stage> {
    let step = Step::new("test", name);
    step.say("running");
    let status = stream(cmd)?;
    let outcome =
        if status.success() { "passed".to_owned() } else { format!("FAILED: cargo test {}", describe(status)) };
    Ok(finish_stage(step, name, status.success(), outcome))
}

/// Ends `step` green or red and records it as a stage.
fn finish_stage(step: Step, name: &str, ok: bool, outcome: String) -> Stage {
    let color = if ok { GREEN } else { RED };
    let took = step.finish(color, &outcome);
    Stage { name: name.to_owned(), color, outcome, took, ok }
}

/// `lb-agent check` on every `examples/*.toml`: the README and
/// docs/config.md send users to them, so each must stay valid.
fn check_examples() -> Result<Stage> {
    let step = Step::new("test", "examples");
    let status = stream(&mut util::release_bins())?;
    if !status.success() {
        return Ok(finish_stage(step, "examples", false, format!("FAILED: cargo build {}", describe(status))));
    }
    let agent = util::built_binary("lb-agent", "lb-agent")?;
    let dir = util::workspace_root().join("examples");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .with_context(|| format!("read {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    files.retain(|p| p.extension().is_some_and(|x| x == "toml"));
    files.sort();
    let mut failed = Vec::new();
    for file in &files {
        // The file alone: this host's interfaces and routes do not decide
        // whether an example is valid.
        let mut check = Command::new(&agent);
        check.arg("check").arg("--file-only").arg(file);
        if !stream(&mut check)?.success() {
            failed.push(file.file_name().unwrap_or_default().to_string_lossy().into_owned());
        }
    }
    let (ok, outcome) = match (files.len(), failed.len()) {
        (0, _) => (false, format!("FAILED: no examples/*.toml in {}", dir.display())),
        (n, 0) => (true, format!("{n} checked")),
        (n, _) => (false, format!("FAILED: {} of {n}: {}", failed.len(), failed.join(", "))),
    };
    Ok(finish_stage(step, "examples", ok, outcome))
}

fn skip_stage(name: &str, why: &str, ok: bool) -> Stage {
    let step = Step::new("test", name);
    let color = if ok { YELLOW } else { RED };
    let took = step.finish(color, why);
    Stage { name: name.to_owned(), color, outcome: why.to_owned(), took, ok }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::{child_outcomes, root_test_files, split_cpu_bound, CPU_BOUND};
    use crate::util::{self, owned as names};

    #[test]
    fn cpu_bound_files_run_apart_from_the_others() {
        let all = names(&["backend_bin", "bench_e2e", "docker_orchestrator", "e2e_netns", "e2e_scaling", "swarm"]);
        let (beside, alone) = split_cpu_bound(all).unwrap();
        assert_eq!(beside, names(&["e2e_netns", "swarm"]));
        assert_eq!(alone, names(&CPU_BOUND));
        let err = split_cpu_bound(names(&["backend_bin", "bench_e2e", "docker_orchestrator", "swarm"])).unwrap_err();
        assert!(err.to_string().contains("tests/tests/e2e_scaling.rs"), "{err}");
    }

    #[test]
    fn the_vm_childs_outcomes_from_its_summary() {
        let out = "[test] vm kernel 6.1 (fixtures, e2e_netns) ... passed: fixtures, e2e_netns on 6.1.0-50 (VM 9.0s) (9.1s)\n\
                   [test] summary\n\
                   [test]   vm kernel 6.1 (fixtures, e2e_netns): passed: fixtures, e2e_netns on 6.1.0-50 (VM 9.0s) (9.1s)\n\
                   [test]   vm kernel 6.12 (fixtures, e2e_netns): FAILED: e2e_netns (exit 101) on 6.12.1 (VM 8.0s) (8.2s)\n";
        assert_eq!(
            child_outcomes(out),
            [
                "passed: fixtures, e2e_netns on 6.1.0-50 (VM 9.0s) (9.1s)",
                "FAILED: e2e_netns (exit 101) on 6.12.1 (VM 8.0s) (8.2s)"
            ]
        );
        assert!(child_outcomes("[test]   vm build: FAILED: no cargo (0.1s)\n").is_empty());
    }

    /// Every test file of the repository runs in one of the two parts.
    #[test]
    fn every_root_test_file_runs_once() {
        let (beside, alone) = root_test_files().unwrap();
        assert_eq!(alone, names(&CPU_BOUND));
        let mut both: Vec<String> = beside.into_iter().chain(alone).collect();
        both.sort();
        let dir = util::workspace_root().join("tests/tests");
        let mut files: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.unwrap().file_name().to_str()?.strip_suffix(".rs").map(str::to_owned))
            .collect();
        files.sort();
        assert_eq!(both, files);
    }

    /// The features of `name` in a `name = { ... features = [...] }` line.
    fn features_of(manifest: &str, name: &str) -> Vec<String> {
        let prefix = format!("{name} = ");
        manifest
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .filter_map(|l| l.split_once("features = [")?.1.split_once(']').map(|(list, _)| list.to_owned()))
            .flat_map(|list| list.split(',').map(|f| f.trim().trim_matches('"').to_owned()).collect::<Vec<_>>())
            .filter(|f| !f.is_empty())
            .collect()
    }

    /// A clap feature only some packages add makes the release bins' build
    /// and the root tests' unify clap differently, and the second rebuild
    /// clap and all on it: the workspace names every feature any adds.
    #[test]
    fn the_workspace_names_every_clap_feature_a_package_adds() {
        let root = util::workspace_root();
        let read = |p: &str| fs::read_to_string(root.join(p)).unwrap_or_else(|e| panic!("read {p}: {e}"));
        let workspace = features_of(&read("Cargo.toml"), "clap");
        assert!(workspace.contains(&"derive".to_owned()), "{workspace:?}");
        let manifest = read("Cargo.toml");
        let members = manifest.split_once("members = [").unwrap().1.split_once(']').unwrap().0;
        for member in members.split(',').map(|m| m.trim().trim_matches('"')).filter(|m| !m.is_empty()) {
            for feature in features_of(&read(&format!("{member}/Cargo.toml")), "clap") {
                assert!(
                    workspace.contains(&feature),
                    "{member} adds clap feature {feature:?}: add it to the workspace's"
                );
            }
        }
    }
}

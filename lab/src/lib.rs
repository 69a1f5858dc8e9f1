//! The lab: what the root tests (tests/), the tools and the benchmark
//! (tools/) share.
//!
//! - [`netns`]: network namespaces as RAII values; [`topology`]: the
//!   client ⇄ LB ⇄ backends network the end-to-end tests and the static demo
//!   run in; [`agent`]: lb-agent as a process inside one; [`scratch`]: the
//!   directories they keep their files in.
//! - [`packet`], [`checksum`], [`diff`]: frames built in code, with their
//!   own checksum code, and readable differences between two frames;
//!   [`testrun`]: the data plane under BPF_PROG_TEST_RUN.
//! - [`root`] and [`docker`]: skip guards for tests that need root or
//!   Docker, and RAII guards for what the Docker tests make; [`command`] and
//!   [`bins`]: running the system's tools and finding this workspace's.
//! - [`cgroup`]: a test's own cgroup v2, for socket load balancing.
//! - [`monitoring`]: real Prometheus and Alertmanager servers for the tests.

pub mod agent;
pub mod bins;
pub mod cgroup;
pub mod checksum;
pub mod command;
pub mod diff;
pub mod docker;
pub mod http;
pub mod monitoring;
pub mod net6;
pub mod netns;
pub mod packet;
pub mod root;
pub mod scratch;
pub mod spread;
pub mod swarm;
pub mod swarm_nodes;
pub mod testrun;
pub mod testrun6;
pub mod topology;

//! The lab: packet builders with their own checksum code, network
//! namespaces, and the data plane under BPF_PROG_TEST_RUN. Shared by the
//! root tests (tests/), the fixtures, the demo and the benchmark (tools/).

pub mod agent;
pub mod bins;
pub mod checksum;
pub mod command;
pub mod diff;
pub mod docker;
pub mod netns;
pub mod packet;
pub mod root;
pub mod scratch;
pub mod testrun;
pub mod topology;

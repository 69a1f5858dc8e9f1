//! Harness for the tests that need root: packet builders with their own
//! checksum code, network namespaces, and the data plane under
//! BPF_PROG_TEST_RUN. Shared by the fixtures, the end-to-end tests, the demo
//! and the benchmark.

pub mod checksum;
pub mod diff;
pub mod docker;
pub mod load;
pub mod netns;
pub mod packet;
pub mod plot;
pub mod root;
pub mod stop;
pub mod testrun;
pub mod topology;

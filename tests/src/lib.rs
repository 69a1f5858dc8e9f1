//! Harness for tests that need root: network namespaces, packet builders.

//! Maglev lookup-table builder (userspace only). Being written.

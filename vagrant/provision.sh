#!/usr/bin/env bash
# Vagrant provisioner (runs as root in the VM): with the toolchain pinned in
# rust-toolchain.toml (the box has it; see README.md), run the steps named
# in LB_PROVISION (build,demo,test): `cargo xtask build`, the short demo,
# and the tests. `cargo xtask` installs the apt packages, rust-src and
# bpf-linker itself. Each step's duration goes to the log and the summary.
set -euo pipefail

cd /work/lb
export PATH="${HOME}/.cargo/bin:${PATH}"
channel=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)
log=/work/lb-provision.log
steps=",${LB_PROVISION:-build,demo,test},"

if ! rustup toolchain list 2>/dev/null | grep -q "^${channel}-"; then
    echo "error: the toolchain ${channel} is not in this VM: the box built by" \
        "\`cargo xtask vagrant-box\` carries it; other boxes need rustup and ${channel}" \
        "for root (static.rust-lang.org must be reachable to install them)" >&2
    exit 1
fi

# step NAME COMMAND...: runs it, logs its output and how long it took.
summary=()
step() {
    local name=$1 start rc
    shift
    [[ "${steps}" == *",${name},"* ]] || return 0
    echo "[provision] ${name}: $*" | tee -a "${log}"
    start=$(date +%s)
    set +e
    "$@" 2>&1 | tee -a "${log}"
    rc=${PIPESTATUS[0]}
    set -e
    summary+=("${name}: exit ${rc} after $(($(date +%s) - start)) s")
    echo "[provision] ${summary[-1]}" | tee -a "${log}"
    return "${rc}"
}

trap 'printf "[provision] %s\n" "${summary[@]}"' EXIT
step build cargo xtask build
step demo cargo xtask run -- --quick
# The qemu VM stage inside this VM would be emulation inside emulation.
step test cargo xtask test --no-vm

#!/usr/bin/env bash
# Vagrant provisioner (runs as root in the VM): make sure rustup and the
# toolchain pinned in rust-toolchain.toml are there, then run the tests.
# `cargo xtask test` installs everything else (apt packages, rust-src,
# bpf-linker) itself.
set -euo pipefail

cd /work/lb
channel=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)

missing=()
for pkg in gcc ca-certificates curl; do
    [[ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" == "install ok installed" ]] \
        || missing+=("$pkg")
done
if ((${#missing[@]})); then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi

if [[ ! -x "${HOME}/.cargo/bin/rustup" ]]; then
    # Needs static.rust-lang.org; see README.md for boxes without it.
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
        | sh -s -- -y --no-modify-path --profile minimal --default-toolchain none
fi
export PATH="${HOME}/.cargo/bin:${PATH}"

if ! grep -q "^${channel}-" <<<"$(rustup toolchain list)"; then
    rustup toolchain install "${channel}" --profile minimal \
        --component rust-src,rustfmt,clippy --no-self-update
fi

cargo xtask test

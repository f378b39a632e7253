#!/usr/bin/env bash
# The project's test command (the README names it; .ci/run runs it).
#   1. formatting and lints, and the static (musl) build
#   2. the guest image, built or reused from the cache (osso-guest build)
#   3. every test in the workspace, with the end-to-end layers required: a
#      layer that cannot run on this machine says SKIPPED with its reason
#      (hardware-KVM-only checks), and a missing prerequisite fails.
#   4. the slow layer-3 boots of the real kernel under this machine's KVM
#      (boot to /init; snapshot and two clones), the ping example (what a
#      newcomer runs first) and the restore example (boot once, snapshot,
#      10 clones that must all answer on their own networks).
#   5. layer 5: every check that needs guest user space (and the whole test
#      suite once more), run by osso-nested: directly on hardware KVM, and
#      otherwise inside a nested KVM (QEMU TCG with an emulated AMD SVM CPU).
#      It writes target/layer5.json; any check that is not "pass" fails this
#      command.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p target
log=target/test-output.txt
: > "$log"
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --release -- -D warnings
echo "== musl build"
cargo build --workspace --release --target x86_64-unknown-linux-musl
echo "== guest image"
t0=$SECONDS
cargo run -q -p osso-guest --release -- build --quiet
echo "guest image ready after $((SECONDS - t0)) s (includes compiling osso-guest)"
eval "$(cargo run -q -p osso-guest --release -- info --json | python3 -c '
import json, shlex, sys
m = json.load(sys.stdin)
print("export OSSO_KERNEL=" + shlex.quote(m["vmlinux_path"]) + " OSSO_INITRD=" + shlex.quote(m["initramfs_path"]))
')"
export OSSO_REQUIRE_E2E=1
if [ -w /dev/kvm ] && [ ! -e /sys/module/kvm_pvm ]; then
  echo "this host has hardware KVM: every check runs directly (layer 5 too)"
else
  # Guest user space never runs under PVM: those checks say where they run
  # (layer 5, below) instead of failing here.
  export OSSO_DEFER_USERSPACE=1
  echo "this host has no hardware KVM: guest-user-space checks run in layer 5 (nested KVM)"
fi
echo "== tests"
cargo test --workspace --release -- --nocapture 2>&1 | tee -a "$log"
echo "== real kernel boot to /init (osso-vmm, layer 3)"
cargo test --release -p osso-vmm --test real_kernel -- --ignored --nocapture 2>&1 | tee -a "$log"
echo "== real kernel snapshot, restored twice (osso-vmm, layer 3)"
cargo test --release -p osso-vmm --test snapshot_real_kernel -- --ignored --nocapture 2>&1 | tee -a "$log"
echo "== the ping example"
cargo run -q --release --example ping -- --json 2>&1 | tee target/ping-example.txt | grep -v '^\[' | tail -5
tail -1 target/ping-example.txt | python3 -c 'import json,sys; m=json.load(sys.stdin); assert m["online"] is True, m; print("ping example: online")'
echo "== the restore example"
cargo run -q --release --example restore -- --json 2>&1 | tee target/restore-example.txt | grep -v '^\[' | tail -4
tail -1 target/restore-example.txt | python3 -c 'import json,sys; m=json.load(sys.stdin); assert m["all_online"] is True, m; print("restore example: %d clones online, restore median %.1f ms" % (m["clones"], m["restore_ms_median"]))'
echo "== layer 5 (guest user space: nested KVM unless this host has hardware KVM)"
t0=$SECONDS
layer5_rc=0
cargo run -q --release -p osso-nested -- --quiet layer5 --report target/layer5.json || layer5_rc=$?
echo "layer 5 took $((SECONDS - t0)) s (exit $layer5_rc); report target/layer5.json"
if [ "$layer5_rc" != 0 ]; then
  echo "layer 5 failed" >&2
  exit "$layer5_rc"
fi
echo "== done in ${SECONDS} s"
echo "== skipped (with reasons)"
grep -h "SKIPPED\|NOT CHECKED" "$log" target/restore-example.txt | sort | uniq -c || echo "none"

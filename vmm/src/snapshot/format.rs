//! The snapshot format, version 2 (version 1 stored KVM structs as hex text
//! and summed the body with FNV-1a; it is refused with a version error).
//!
//! A snapshot is a directory of two files:
//!
//! * `state.osso`: one line of JSON, the [`Header`], a newline, then the body:
//!   the JSON of [`SnapshotBody`], exactly `header.body_len` bytes whose
//!   CRC-64/XZ is `header.body_crc64`. The header is read first and
//!   checked (magic, format version, the [`HostFacts`] that must match this
//!   host) before the body is even parsed, so an incompatible snapshot is
//!   refused with an error naming what differs; a body that is shorter than
//!   announced is "truncated", one whose hash differs is "corrupt".
//! * `memory.raw`: guest RAM from guest physical address 0, raw, exactly
//!   `header.memory_bytes` long. Restore maps it copy-on-write (`MAP_PRIVATE`).
//!
//! KVM structs are stored as their bytes, by kvm-bindings' `serde` feature
//! (`kvm/blob.rs`: `KvmBlob`; `kvm_fpu` field by field, `Fpu`). The VMM's own device
//! state is plain JSON.
//!
//! What is *not* in a snapshot: the user-mode network stack (smoltcp) and
//! host-side connections. A restored VM gets a fresh user network: TCP
//! connections the guest had through it are lost (the guest sees resets or
//! timeouts), and the gateway's ARP entry for the guest is learnt again from
//! the guest's next frame. Nothing else needs renaming, since each clone's
//! user network is private to it.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::SnapshotError;
pub use crate::devices::serial::SerialState;
pub use crate::kvm::vcpu::state::{MsrValue, VcpuState};
pub use crate::kvm::vm_state::VmState;
pub use crate::virtio::state::{VirtioMmioState, VirtioNetState, VirtqueueState};

/// Magic string in every header.
pub const MAGIC: &str = "osso-snapshot";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 2;
/// The state file's name in a snapshot directory.
pub const STATE_FILE: &str = "state.osso";
/// The guest memory file's name in a snapshot directory.
pub const MEMORY_FILE: &str = "memory.raw";
/// The longest header line accepted.
const MAX_HEADER_LEN: usize = 64 * 1024;

/// Facts about the host that a snapshot's vCPU state depends on: restoring on
/// a host where any differs is refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFacts {
    /// `pvm`, `kvm_intel`, `kvm_amd` or `unknown` (the module behind /dev/kvm).
    pub kvm_kind: String,
    /// `KVM_GET_API_VERSION`.
    pub kvm_api_version: i32,
    /// `vendor_id` of /proc/cpuinfo.
    pub cpu_vendor: String,
    /// `cpu family`, `model` and `stepping` of /proc/cpuinfo.
    pub cpu_family_model: String,
    /// `model name` of /proc/cpuinfo (informative, also compared).
    pub cpu_model_name: String,
}

impl HostFacts {
    /// The facts of this host (`kvm_api_version` from the caller's `/dev/kvm`).
    pub fn current(kvm_api_version: i32) -> Self {
        let kvm_kind = if Path::new("/sys/module/kvm_pvm").exists() {
            "pvm"
        } else if Path::new("/sys/module/kvm_intel").exists() {
            "kvm_intel"
        } else if Path::new("/sys/module/kvm_amd").exists() {
            "kvm_amd"
        } else {
            "unknown"
        };
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let field = |name: &str| {
            cpuinfo
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    (k.trim() == name).then(|| v.trim().to_string())
                })
                .unwrap_or_default()
        };
        HostFacts {
            kvm_kind: kvm_kind.to_string(),
            kvm_api_version,
            cpu_vendor: field("vendor_id"),
            cpu_family_model: format!(
                "{}/{}/{}",
                field("cpu family"),
                field("model"),
                field("stepping")
            ),
            cpu_model_name: field("model name"),
        }
    }

    /// The first fact that differs: (name, snapshot's, host's).
    pub fn first_mismatch(&self, host: &HostFacts) -> Option<(&'static str, String, String)> {
        let pairs = [
            ("KVM kind", &self.kvm_kind, &host.kvm_kind),
            ("CPU vendor", &self.cpu_vendor, &host.cpu_vendor),
            (
                "CPU family/model/stepping",
                &self.cpu_family_model,
                &host.cpu_family_model,
            ),
            ("CPU model name", &self.cpu_model_name, &host.cpu_model_name),
        ];
        for (name, a, b) in pairs {
            if a != b {
                return Some((name, a.clone(), b.clone()));
            }
        }
        if self.kvm_api_version != host.kvm_api_version {
            return Some((
                "KVM API version",
                self.kvm_api_version.to_string(),
                host.kvm_api_version.to_string(),
            ));
        }
        None
    }
}

/// The first line of the state file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Always [`MAGIC`].
    pub magic: String,
    /// [`FORMAT_VERSION`] when written.
    pub format_version: u32,
    /// The osso-vmm version that wrote it.
    pub vmm_version: String,
    /// The host it was taken on.
    pub host: HostFacts,
    /// Length of the body in bytes.
    pub body_len: u64,
    /// CRC-64/XZ of the body, hex.
    pub body_crc64: String,
    /// Length of `memory.raw` in bytes.
    pub memory_bytes: u64,
}

/// The fields every format version's header starts with.
#[derive(Deserialize)]
struct HeaderIdent {
    magic: String,
    format_version: u32,
    #[serde(default)]
    vmm_version: String,
}

/// The VMM's devices. The i8042 (reset only) and the boot timer (a
/// write-once milestone of the original boot) hold no guest-visible state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceStates {
    /// The console UART.
    pub serial: SerialState,
    /// MMIO bus ranges present when the snapshot was taken (base, length):
    /// a restore refuses a snapshot with devices it cannot re-create.
    pub mmio_ranges: Vec<(u64, u64)>,
    /// The virtio-net device, if the VM had one.
    #[serde(default)]
    pub net: Option<VirtioNetState>,
}

/// Everything but guest memory.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SnapshotBody {
    /// Guest RAM size in MiB.
    pub mem_mib: u64,
    /// The kernel command line or boot protocol the VM was started with
    /// (informative).
    pub boot_protocol: String,
    /// One per vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// VM-wide KVM state.
    pub vm: VmState,
    /// Devices.
    pub devices: DeviceStates,
}

/// The body's checksum: CRC-64/XZ (the one xz and most tools call CRC-64).
pub fn crc64(b: &[u8]) -> u64 {
    const CRC64: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);
    CRC64.checksum(b)
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `state.osso` in `dir` (which must exist).
pub fn write_state(
    dir: &Path,
    host: &HostFacts,
    body: &SnapshotBody,
    memory_bytes: u64,
) -> Result<PathBuf, SnapshotError> {
    let body_json = serde_json::to_vec(body).map_err(|e| SnapshotError::Encode(e.to_string()))?;
    let header = Header {
        magic: MAGIC.to_string(),
        format_version: FORMAT_VERSION,
        vmm_version: env!("CARGO_PKG_VERSION").to_string(),
        host: host.clone(),
        body_len: body_json.len() as u64,
        body_crc64: format!("{:016x}", crc64(&body_json)),
        memory_bytes,
    };
    let mut out = serde_json::to_vec(&header).map_err(|e| SnapshotError::Encode(e.to_string()))?;
    out.push(b'\n');
    out.extend_from_slice(&body_json);
    let path = dir.join(STATE_FILE);
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(&out).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
    Ok(path)
}

/// Reads and checks `state.osso` in `dir` against `host`.
pub fn read_state(dir: &Path, host: &HostFacts) -> Result<(Header, SnapshotBody), SnapshotError> {
    let path = dir.join(STATE_FILE);
    let bytes = std::fs::read(&path).map_err(io_err(&path))?;
    parse_state(&path, &bytes, host)
}

/// Parses and checks a state file's bytes (`path` is for messages).
pub fn parse_state(
    path: &Path,
    bytes: &[u8],
    host: &HostFacts,
) -> Result<(Header, SnapshotBody), SnapshotError> {
    let not_snapshot = |reason: String| SnapshotError::NotASnapshot {
        path: path.to_path_buf(),
        reason,
    };
    let nl = bytes
        .iter()
        .take(MAX_HEADER_LEN)
        .position(|b| *b == b'\n')
        .ok_or_else(|| not_snapshot("no header line".into()))?;
    // Magic and version first: the rest of the header may have another
    // shape in another version, and that is a version error, not damage.
    let ident: HeaderIdent = serde_json::from_slice(&bytes[..nl])
        .map_err(|e| not_snapshot(format!("header is not valid: {e}")))?;
    if ident.magic != MAGIC {
        return Err(not_snapshot(format!("bad magic {:?}", ident.magic)));
    }
    if ident.format_version != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            found: ident.format_version,
            supported: FORMAT_VERSION,
            written_by: ident.vmm_version,
        });
    }
    let header: Header = serde_json::from_slice(&bytes[..nl])
        .map_err(|e| not_snapshot(format!("header is not valid: {e}")))?;
    if let Some((what, snap, here)) = header.host.first_mismatch(host) {
        return Err(SnapshotError::HostMismatch {
            what,
            snapshot: snap,
            host: here,
        });
    }
    let body = &bytes[nl + 1..];
    if (body.len() as u64) < header.body_len {
        return Err(SnapshotError::Truncated {
            path: path.to_path_buf(),
            expected: header.body_len,
            found: body.len() as u64,
        });
    }
    if body.len() as u64 != header.body_len {
        return Err(SnapshotError::Corrupt {
            path: path.to_path_buf(),
            reason: format!(
                "{} bytes after the body (expected {})",
                body.len() as u64 - header.body_len,
                header.body_len
            ),
        });
    }
    let sum = format!("{:016x}", crc64(body));
    if sum != header.body_crc64 {
        return Err(SnapshotError::Corrupt {
            path: path.to_path_buf(),
            reason: format!(
                "body checksum {sum} differs from the header's {}",
                header.body_crc64
            ),
        });
    }
    let parsed: SnapshotBody =
        serde_json::from_slice(body).map_err(|e| SnapshotError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("body: {e}"),
        })?;
    Ok((header, parsed))
}

/// Checks that `memory.raw` in `dir` has the size the header announces.
pub fn check_memory_file(dir: &Path, header: &Header) -> Result<PathBuf, SnapshotError> {
    let path = dir.join(MEMORY_FILE);
    let len = std::fs::metadata(&path).map_err(io_err(&path))?.len();
    if len < header.memory_bytes {
        return Err(SnapshotError::Truncated {
            path,
            expected: header.memory_bytes,
            found: len,
        });
    }
    if len != header.memory_bytes {
        return Err(SnapshotError::Corrupt {
            path,
            reason: format!("{len} bytes, expected {}", header.memory_bytes),
        });
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvm::blob::{Fpu, KvmBlob};

    fn host() -> HostFacts {
        HostFacts {
            kvm_kind: "pvm".into(),
            kvm_api_version: 12,
            cpu_vendor: "GenuineIntel".into(),
            cpu_family_model: "6/143/8".into(),
            cpu_model_name: "Some CPU".into(),
        }
    }

    fn sample_body() -> SnapshotBody {
        let mut lapic = kvm_bindings::kvm_lapic_state::default();
        lapic.regs[0x20] = 7;
        let sregs = kvm_bindings::kvm_sregs {
            cr0: 0x8000_0011,
            cs: kvm_bindings::kvm_segment {
                selector: 0x10,
                ..Default::default()
            },
            ..Default::default()
        };
        let mut fpu = kvm_bindings::kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        fpu.xmm[3][5] = 9;
        let mut xsave = kvm_bindings::kvm_xsave::default();
        xsave.region[100] = 0xabcd;
        let mut xcrs = kvm_bindings::kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        };
        xcrs.xcrs[0].value = 7;
        let events = kvm_bindings::kvm_vcpu_events {
            flags: 3,
            ..Default::default()
        };
        let mut ioapic = kvm_bindings::kvm_irqchip {
            chip_id: 2,
            ..Default::default()
        };
        // SAFETY (test): writing a byte of the union's raw array.
        unsafe { ioapic.chip.dummy[17] = 0x42 };
        let mut pit = kvm_bindings::kvm_pit_state2::default();
        pit.channels[0].count = 0x1234;
        let clock = kvm_bindings::kvm_clock_data {
            clock: 987_654_321,
            ..Default::default()
        };
        SnapshotBody {
            mem_mib: 16,
            boot_protocol: "raw".into(),
            vcpus: vec![VcpuState {
                id: 0,
                cpuid: vec![KvmBlob(kvm_bindings::kvm_cpuid_entry2 {
                    function: 1,
                    eax: 0x806f8,
                    ..Default::default()
                })],
                regs: KvmBlob(kvm_bindings::kvm_regs {
                    rax: 42,
                    rip: 0x1000,
                    rflags: 2,
                    ..Default::default()
                }),
                sregs: KvmBlob(sregs),
                fpu: Some(Fpu(fpu)),
                xsave: Some(KvmBlob(xsave)),
                xcrs: Some(KvmBlob(xcrs)),
                debugregs: Some(KvmBlob(kvm_bindings::kvm_debugregs {
                    dr7: 0x400,
                    ..Default::default()
                })),
                lapic: Some(KvmBlob(lapic)),
                msrs: vec![MsrValue {
                    index: 0x10,
                    data: 99,
                }],
                mp_state: Some(KvmBlob(kvm_bindings::kvm_mp_state { mp_state: 0 })),
                events: Some(KvmBlob(events)),
                unsupported: vec!["xsave: not on this host".into()],
            }],
            vm: VmState {
                irqchips: vec![KvmBlob(ioapic)],
                pit: Some(KvmBlob(pit)),
                clock: Some(KvmBlob(clock)),
                unsupported: vec![],
            },
            devices: DeviceStates {
                serial: SerialState(vm_superio::serial::SerialState {
                    baud_divisor_low: 12,
                    baud_divisor_high: 0,
                    interrupt_enable: 1,
                    interrupt_identification: 1,
                    line_control: 3,
                    line_status: 0x60,
                    modem_control: 8,
                    modem_status: 0xb0,
                    scratch: 0,
                    in_buffer: b"hi".to_vec(),
                }),
                mmio_ranges: vec![(0xc000_0000, 0x1000)],
                net: Some(VirtioNetState {
                    mmio_base: 0xd000_0000,
                    irq: 5,
                    mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
                    transport: VirtioMmioState {
                        device_type: 1,
                        driver_features: 1 << 32,
                        status: 15,
                        interrupt_status: 1,
                        queues: vec![VirtqueueState {
                            size: 256,
                            ready: true,
                            desc_table: 0x1000,
                            avail_ring: 0x2000,
                            used_ring: 0x3000,
                            next_avail: 7,
                            next_used: 7,
                        }],
                        ..Default::default()
                    },
                }),
            },
        }
    }

    fn write_sample() -> (tempfile::TempDir, SnapshotBody) {
        let d = tempfile::tempdir().unwrap();
        let b = sample_body();
        write_state(d.path(), &host(), &b, 16 << 20).unwrap();
        (d, b)
    }

    #[test]
    fn every_state_piece_round_trips() {
        let (d, b) = write_sample();
        let (h, back) = read_state(d.path(), &host()).unwrap();
        assert_eq!(back, b);
        assert_eq!(h.memory_bytes, 16 << 20);
        assert_eq!(h.format_version, FORMAT_VERSION);
        // Spot checks through the typed fields, not only the bytes.
        let v = &back.vcpus[0];
        assert_eq!(v.regs.0.rax, 42);
        assert_eq!(v.sregs.0.cs.selector, 0x10);
        assert_eq!(v.fpu.as_ref().unwrap().0.xmm[3][5], 9);
        assert_eq!(v.xsave.as_ref().unwrap().0.region[100], 0xabcd);
        assert_eq!(v.xcrs.as_ref().unwrap().0.xcrs[0].value, 7);
        assert_eq!(v.lapic.as_ref().unwrap().0.regs[0x20], 7);
        assert_eq!(v.events.as_ref().unwrap().0.flags, 3);
        assert_eq!(v.cpuid[0].0.eax, 0x806f8);
        assert_eq!(back.vm.pit.as_ref().unwrap().0.channels[0].count, 0x1234);
        assert_eq!(back.vm.clock.as_ref().unwrap().0.clock, 987_654_321);
        // SAFETY (test): reading the union's raw array.
        assert_eq!(unsafe { back.vm.irqchips[0].0.chip.dummy[17] }, 0x42);
        assert_eq!(back.devices.serial.0.in_buffer, b"hi");
        assert_eq!(back.devices.serial.0.modem_status, 0xb0);
    }

    #[test]
    fn truncated_state_is_refused() {
        let (d, _) = write_sample();
        let p = d.path().join(STATE_FILE);
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 10]).unwrap();
        let e = read_state(d.path(), &host()).unwrap_err();
        assert!(matches!(e, SnapshotError::Truncated { .. }), "{e}");
        assert!(e.to_string().contains("truncated"), "{e}");
        // Cut inside the header: not a snapshot.
        std::fs::write(&p, &bytes[..20]).unwrap();
        let e = read_state(d.path(), &host()).unwrap_err();
        assert!(matches!(e, SnapshotError::NotASnapshot { .. }), "{e}");
    }

    #[test]
    fn corrupt_state_is_refused() {
        let (d, _) = write_sample();
        let p = d.path().join(STATE_FILE);
        let mut bytes = std::fs::read(&p).unwrap();
        let n = bytes.len();
        // Flip a digit inside the body (keeps the JSON valid-looking).
        let i = n - 40;
        bytes[i] = if bytes[i] == b'1' { b'2' } else { b'1' };
        std::fs::write(&p, &bytes).unwrap();
        let e = read_state(d.path(), &host()).unwrap_err();
        assert!(matches!(e, SnapshotError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains("checksum"), "{e}");
        std::fs::write(&p, b"hello world\n{}").unwrap();
        let e = read_state(d.path(), &host()).unwrap_err();
        assert!(matches!(e, SnapshotError::NotASnapshot { .. }), "{e}");
    }

    #[test]
    fn a_version_1_snapshot_is_refused_with_a_version_error() {
        // The state file as osso-vmm 0.1 wrote version 1: the header had
        // `body_fnv1a64`, the body hex strings for KVM structs.
        let body = br#"{"mem_mib":128,"boot_protocol":"pvh","vcpus":[{"id":0,"cpuid":[],"regs":"00","sregs":"00"}]}"#;
        let header = format!(
            r#"{{"magic":"osso-snapshot","format_version":1,"vmm_version":"0.1.0","host":{{"kvm_kind":"pvm","kvm_api_version":12,"cpu_vendor":"GenuineIntel","cpu_family_model":"6/85/7","cpu_model_name":"x"}},"body_len":{},"body_fnv1a64":"0123456789abcdef","memory_bytes":0}}"#,
            body.len()
        );
        let d = tempfile::tempdir().unwrap();
        let mut bytes = header.into_bytes();
        bytes.push(b'\n');
        bytes.extend_from_slice(body);
        std::fs::write(d.path().join(STATE_FILE), bytes).unwrap();
        let e = read_state(d.path(), &host()).unwrap_err();
        assert!(
            matches!(
                e,
                SnapshotError::Version {
                    found: 1,
                    supported: FORMAT_VERSION,
                    ..
                }
            ),
            "{e}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("format version 1") && msg.contains("osso-vmm 0.1.0"),
            "{msg}"
        );
    }

    #[test]
    fn other_version_or_host_is_refused() {
        let (d, b) = write_sample();
        let p = d.path().join(STATE_FILE);
        let text = std::fs::read_to_string(&p).unwrap();
        let v3 = text.replacen("\"format_version\":2", "\"format_version\":3", 1);
        std::fs::write(&p, v3).unwrap();
        let e = read_state(d.path(), &host()).unwrap_err();
        assert!(
            matches!(
                e,
                SnapshotError::Version {
                    found: 3,
                    supported: 2,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("format version 3"), "{e}");

        write_state(d.path(), &host(), &b, 0).unwrap();
        let mut other = host();
        other.kvm_kind = "kvm_intel".into();
        let e = read_state(d.path(), &other).unwrap_err();
        assert!(
            matches!(
                e,
                SnapshotError::HostMismatch {
                    what: "KVM kind",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("pvm"), "{e}");
        let mut other = host();
        other.cpu_vendor = "AuthenticAMD".into();
        assert!(matches!(
            read_state(d.path(), &other),
            Err(SnapshotError::HostMismatch {
                what: "CPU vendor",
                ..
            })
        ));
    }

    #[test]
    fn memory_file_size_is_checked() {
        let (d, _) = write_sample();
        let (h, _) = read_state(d.path(), &host()).unwrap();
        std::fs::write(d.path().join(MEMORY_FILE), vec![0u8; 4096]).unwrap();
        let e = check_memory_file(d.path(), &h).unwrap_err();
        assert!(matches!(e, SnapshotError::Truncated { .. }), "{e}");
        let f = std::fs::File::create(d.path().join(MEMORY_FILE)).unwrap();
        f.set_len(16 << 20).unwrap();
        check_memory_file(d.path(), &h).unwrap();
        std::fs::remove_file(d.path().join(MEMORY_FILE)).unwrap();
        assert!(matches!(
            check_memory_file(d.path(), &h),
            Err(SnapshotError::Io { .. })
        ));
    }

    #[test]
    fn host_facts_of_this_machine_are_filled() {
        let h = HostFacts::current(12);
        assert!(h.first_mismatch(&h).is_none());
        assert!(!h.cpu_vendor.is_empty());
    }
}

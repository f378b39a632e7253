//! Per-run metrics: a timeline of boot milestones and memory figures.
//!
//! Every timestamp is a duration from the VM's start instant (the moment the
//! caller says the VM was requested: [`crate::VmConfig::start`], by default the
//! call that created the machine), in microseconds, measured with the
//! monotonic clock (`std::time::Instant`).
//!
//! Memory: the guest RAM resident is counted with `mincore(2)` over the guest
//! RAM mapping (pages the guest touched, or the VMM wrote while loading); the
//! process RSS is `/proc/self/statm`'s resident count; the VMM's own RSS is the
//! difference; the VMM's anonymous RSS is `RssAnon` of `/proc/self/status` less
//! the guest resident (heap and stacks, without shared library pages). All are
//! taken when the VM ends, before guest RAM is unmapped.

use std::sync::OnceLock;
use std::time::Instant;

use serde::Serialize;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Called after each milestone is recorded (from the thread that saw it).
pub type MilestoneObserver = Box<dyn Fn() + Send + Sync>;

/// Milestones of one run, recorded from any thread. One observer may be told
/// of each ([`Timeline::observe`]), so that a waiter sleeps until something
/// happened instead of polling.
pub struct Timeline {
    start: Instant,
    first_kvm_run: OnceLock<u64>,
    init_started: OnceLock<u64>,
    kernel_panic: OnceLock<u64>,
    boot_timer: OnceLock<u64>,
    observer: OnceLock<MilestoneObserver>,
}

impl std::fmt::Debug for Timeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Timeline")
            .field("first_kvm_run", &self.first_kvm_run.get())
            .field("init_started", &self.init_started.get())
            .field("kernel_panic", &self.kernel_panic.get())
            .field("boot_timer", &self.boot_timer.get())
            .field("observed", &self.observer.get().is_some())
            .finish()
    }
}

impl Timeline {
    /// A timeline starting at `start`.
    pub fn new(start: Instant) -> Self {
        Timeline {
            start,
            first_kvm_run: OnceLock::new(),
            init_started: OnceLock::new(),
            kernel_panic: OnceLock::new(),
            boot_timer: OnceLock::new(),
            observer: OnceLock::new(),
        }
    }

    /// Calls `f` after every milestone recorded from now on. One observer
    /// per timeline: false (and `f` dropped) if one is set already. A
    /// milestone recorded before this call is not reported: read the
    /// timeline after setting the observer.
    pub fn observe(&self, f: MilestoneObserver) -> bool {
        self.observer.set(f).is_ok()
    }

    fn mark(&self, slot: &OnceLock<u64>) {
        let mut first = false;
        let _ = slot.get_or_init(|| {
            first = true;
            self.now_us()
        });
        if first {
            if let Some(f) = self.observer.get() {
                f();
            }
        }
    }

    /// The start instant.
    pub fn start(&self) -> Instant {
        self.start
    }

    /// Microseconds from the start to now.
    pub fn now_us(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Records the first `KVM_RUN` (only the first call counts).
    pub fn mark_first_kvm_run(&self) {
        self.mark(&self.first_kvm_run);
    }
    /// Records that `/init` started: the console line `Run /init as init
    /// process`, or `/init`'s write of 1 to the boot timer (the first counts).
    pub fn mark_init_started(&self) {
        self.mark(&self.init_started);
    }
    /// Records a kernel panic line on the console.
    pub fn mark_kernel_panic(&self) {
        self.mark(&self.kernel_panic);
    }
    /// Records the guest's boot-timer write.
    pub fn mark_boot_timer(&self) {
        self.mark(&self.boot_timer);
    }

    /// First `KVM_RUN`, if any.
    pub fn first_kvm_run_us(&self) -> Option<u64> {
        self.first_kvm_run.get().copied()
    }
    /// `/init` started (see [`Timeline::mark_init_started`]), if it has.
    pub fn init_started_us(&self) -> Option<u64> {
        self.init_started.get().copied()
    }
    /// Kernel panic seen, if any.
    pub fn kernel_panic_us(&self) -> Option<u64> {
        self.kernel_panic.get().copied()
    }
    /// Boot timer written, if ever.
    pub fn boot_timer_us(&self) -> Option<u64> {
        self.boot_timer.get().copied()
    }
}

/// What one run measured, as the VMM sees it (the SDK turns it into its own
/// `osso_sdk::Metrics`, the one a user reads). Serialised by `osso-vmm
/// --metrics-json`.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct RunMetrics {
    /// Always 0: the reference point of the other timestamps.
    pub start_us: u64,
    /// Start to the first `KVM_RUN` (VMM setup time).
    pub first_kvm_run_us: Option<u64>,
    /// Start to `/init`'s start: the console line `Run /init as init
    /// process` or `/init`'s write of 1 to the boot timer, the first of the two.
    pub init_started_us: Option<u64>,
    /// Start to a `Kernel panic` console line.
    pub kernel_panic_us: Option<u64>,
    /// Start to the guest's write of 123 to the boot timer (ready).
    pub boot_timer_us: Option<u64>,
    /// Start to the end of the VM.
    pub end_us: u64,
    /// Why the VM ended (see [`crate::ExitReason`]), as text.
    pub exit_reason: String,
    /// Boot protocol used (`pvh`, `linux-64bit`, `raw-code`).
    pub boot_protocol: String,
    /// Guest RAM size, bytes.
    pub guest_mem_bytes: u64,
    /// Guest RAM resident in the VMM process, bytes (mincore on the mapping).
    pub guest_resident_bytes: u64,
    /// Whole process RSS, bytes (/proc/self/statm).
    pub process_rss_bytes: u64,
    /// Process RSS without the guest RAM resident, bytes.
    pub vmm_rss_bytes: u64,
    /// Anonymous (private: heap, stacks) RSS without the guest RAM resident,
    /// bytes: the VMM's own memory without the shared library and
    /// executable pages counted in `vmm_rss_bytes`.
    pub vmm_anon_rss_bytes: u64,
    /// Set when the VM was restored from a snapshot: how long each restore
    /// phase took.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreMetrics>,
}

/// The phases of a restore from a snapshot, each measured with the monotonic
/// clock around its own step, in microseconds.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct RestoreMetrics {
    /// Open /dev/kvm, read and check the state file, check the memory file.
    pub read_state_us: u64,
    /// Map the memory file copy-on-write.
    pub map_memory_us: u64,
    /// Create the VM (memory slot, irqchip, PIT) and the legacy devices.
    pub create_vm_us: u64,
    /// Load the irqchip, PIT and clock state.
    pub irqchip_us: u64,
    /// Load the device state (UART).
    pub devices_us: u64,
    /// Create the vCPUs and load their state.
    pub vcpus_us: u64,
    /// The call to restore up to starting the vCPU threads.
    pub total_us: u64,
}

/// Memory figures at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryFigures {
    /// Guest RAM size, bytes.
    pub guest_mem_bytes: u64,
    /// Guest RAM resident, bytes.
    pub guest_resident_bytes: u64,
    /// Process RSS, bytes.
    pub process_rss_bytes: u64,
    /// Process RSS less guest resident, bytes.
    pub vmm_rss_bytes: u64,
    /// Anonymous RSS less guest resident, bytes.
    pub vmm_anon_rss_bytes: u64,
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let ps = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(ps).ok().filter(|p| *p > 0).unwrap_or(4096)
}

/// The process's resident set size in bytes, from `/proc/self/statm`.
pub fn process_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages * page_size())
        .unwrap_or(0)
}

/// The process's anonymous resident memory in bytes (`RssAnon` in
/// `/proc/self/status`).
pub fn process_anon_rss_bytes() -> u64 {
    proc_kib_field("/proc/self/status", "RssAnon:")
}

/// The `key` line of a /proc file that lists sizes as `Key:  N kB`, in
/// bytes; 0 if the file or the line is missing.
fn proc_kib_field(path: &str, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with(key))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map(|kib| kib * 1024)
        .unwrap_or(0)
}

/// Resident bytes of guest RAM, counted with `mincore(2)` over each region.
pub fn guest_resident_bytes(mem: &GuestMemoryMmap) -> u64 {
    let ps = page_size();
    let mut total = 0u64;
    for region in mem.iter() {
        let len = region.len();
        let Ok(ptr) = mem.get_host_address(region.start_addr()) else {
            continue;
        };
        let Ok(len_usize) = usize::try_from(len) else {
            continue;
        };
        let pages = len_usize.div_ceil(ps as usize);
        let mut vec = vec![0u8; pages];
        // SAFETY: `ptr..ptr+len` is the live, page-aligned mapping of this
        // region (owned by `mem`, which we borrow), and `vec` has one byte per
        // page of it, as mincore requires.
        let rc = unsafe { libc::mincore(ptr.cast(), len_usize, vec.as_mut_ptr()) };
        if rc == 0 {
            total += vec.iter().filter(|b| **b & 1 != 0).count() as u64 * ps;
        }
    }
    total
}

/// The process's proportional set size in bytes (`Pss` in
/// `/proc/self/smaps_rollup`): resident memory with each page shared by N
/// mappings counted 1/N. For clones of one snapshot (which share its page
/// cache pages) this is what they cost together; RSS would count a shared
/// page once per clone.
pub fn process_pss_bytes() -> u64 {
    proc_kib_field("/proc/self/smaps_rollup", "Pss:")
}

/// How one guest RAM mapping uses host memory, from `/proc/self/smaps`.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct MappingUsage {
    /// Pages of the mapping resident in this process (shared ones included).
    pub rss_bytes: u64,
    /// The same with each shared page divided among its mappings.
    pub pss_bytes: u64,
    /// Pages only this mapping holds (a restored clone's copy-on-write
    /// copies and the snapshot pages no other clone maps at the moment, or
    /// all touched pages of a cold VM's anonymous RAM).
    pub private_bytes: u64,
    /// Of those, the dirty ones (`Private_Dirty`): a clone's copy-on-write
    /// copies, and snapshot pages still dirty in the page cache while no
    /// other mapping shares them.
    pub private_dirty_bytes: u64,
}

/// [`MappingUsage`] of each guest RAM region of `mem`, summed. Zero if
/// `/proc/self/smaps` cannot be read.
pub fn guest_mapping_usage(mem: &GuestMemoryMmap) -> MappingUsage {
    let starts: Vec<u64> = mem
        .iter()
        .filter_map(|r| mem.get_host_address(r.start_addr()).ok())
        .map(|p| p as u64)
        .collect();
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return MappingUsage::default();
    };
    parse_smaps(&smaps, &starts)
}

/// Sums the usage of the mappings of `smaps` that start at one of `starts`.
fn parse_smaps(smaps: &str, starts: &[u64]) -> MappingUsage {
    let mut total = MappingUsage::default();
    let mut inside = false;
    for line in smaps.lines() {
        let mut it = line.split_whitespace();
        let first = it.next().unwrap_or("");
        if !first.ends_with(':') {
            // A mapping header: "start-end perms offset dev inode [path]".
            if let Some((start, _)) = first.split_once('-') {
                inside = u64::from_str_radix(start, 16)
                    .map(|a| starts.contains(&a))
                    .unwrap_or(false);
            }
            continue;
        }
        if !inside {
            continue;
        }
        let kib: u64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        match first {
            "Rss:" => total.rss_bytes += kib * 1024,
            "Pss:" => total.pss_bytes += kib * 1024,
            "Private_Clean:" => total.private_bytes += kib * 1024,
            "Private_Dirty:" => {
                total.private_bytes += kib * 1024;
                total.private_dirty_bytes += kib * 1024;
            }
            _ => {}
        }
    }
    total
}

/// One VM's own VMM memory in a process that holds more than it (an
/// application embedding the SDK, other VMs, an image build that ran
/// first): the growth of the process RSS since `baseline_rss_bytes` (taken
/// just before the VMM started on this VM) less this VM's guest RAM pages
/// in the process RSS. Zero when the process shrank meanwhile. Whatever
/// else the process allocated after the baseline (another VM starting, the
/// application) counts too: the figure is exact only when this VM is all
/// that ran since.
pub fn vmm_rss_since(baseline_rss_bytes: u64, process_rss_bytes: u64, guest_rss_bytes: u64) -> u64 {
    process_rss_bytes
        .saturating_sub(baseline_rss_bytes)
        .saturating_sub(guest_rss_bytes)
}

/// Measures the memory figures now.
pub fn memory_figures(mem: &GuestMemoryMmap) -> MemoryFigures {
    let guest_resident_bytes = guest_resident_bytes(mem);
    let process_rss_bytes = process_rss_bytes();
    let anon = process_anon_rss_bytes();
    MemoryFigures {
        vmm_anon_rss_bytes: anon.saturating_sub(guest_resident_bytes),
        guest_mem_bytes: mem.iter().map(|r| r.len()).sum(),
        guest_resident_bytes,
        process_rss_bytes,
        vmm_rss_bytes: process_rss_bytes.saturating_sub(guest_resident_bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn the_observer_hears_each_first_mark_once() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let t = Timeline::new(Instant::now());
        t.mark_first_kvm_run(); // before the observer: not reported
        let heard = Arc::new(AtomicUsize::new(0));
        let h = heard.clone();
        assert!(t.observe(Box::new(move || {
            h.fetch_add(1, Ordering::SeqCst);
        })));
        assert!(!t.observe(Box::new(|| {})), "one observer per timeline");
        t.mark_boot_timer();
        t.mark_boot_timer();
        t.mark_init_started();
        t.mark_first_kvm_run();
        assert_eq!(heard.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn timeline_keeps_first_mark() {
        let t = Timeline::new(Instant::now());
        assert_eq!(t.boot_timer_us(), None);
        t.mark_boot_timer();
        let first = t.boot_timer_us().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        t.mark_boot_timer();
        assert_eq!(t.boot_timer_us(), Some(first));
    }

    #[test]
    fn guest_resident_counts_touched_pages() {
        let mem = crate::layout::create_guest_memory(16).unwrap();
        let before = guest_resident_bytes(&mem);
        assert_eq!(before, 0, "fresh anonymous mapping has nothing resident");
        for i in 0..10u64 {
            mem.write_obj(1u8, GuestAddress(i * 4096)).unwrap();
        }
        // At least the ten pages (transparent huge pages may bring in more).
        assert!(guest_resident_bytes(&mem) >= 10 * 4096);
        let f = memory_figures(&mem);
        assert_eq!(f.guest_mem_bytes, 16 << 20);
        assert!(f.process_rss_bytes > f.guest_resident_bytes);
        assert_eq!(
            f.vmm_rss_bytes,
            f.process_rss_bytes - f.guest_resident_bytes
        );
        assert!(f.vmm_anon_rss_bytes > 0 && f.vmm_anon_rss_bytes < f.vmm_rss_bytes);
    }

    #[test]
    fn vmm_rss_since_counts_growth_without_guest_ram() {
        // 40 MiB before the VMM (say an image build's heap), 58 MiB now
        // with 16 MiB of guest RAM resident: the VMM holds 2 MiB.
        assert_eq!(vmm_rss_since(40 << 20, 58 << 20, 16 << 20), 2 << 20);
        // The process shrank (the application freed memory): zero, not a wrap.
        assert_eq!(vmm_rss_since(40 << 20, 30 << 20, 1 << 20), 0);
        assert_eq!(vmm_rss_since(10, 15, 20), 0);
        // No baseline: the whole process less guest RAM (what a standalone VMM reports).
        assert_eq!(vmm_rss_since(0, 58 << 20, 16 << 20), 42 << 20);
    }

    #[test]
    fn smaps_of_the_guest_mappings_only() {
        let smaps = "\
7f0000000000-7f0008000000 rw-p 00000000 00:00 0
Size:             131072 kB
Rss:                2048 kB
Pss:                1024 kB
Private_Clean:         4 kB
Private_Dirty:       512 kB
7f0010000000-7f0010001000 r--p 00000000 08:01 42   /usr/lib/x.so
Rss:                   4 kB
Pss:                   4 kB
Private_Dirty:         4 kB
";
        let u = parse_smaps(smaps, &[0x7f00_0000_0000]);
        assert_eq!(
            u,
            MappingUsage {
                rss_bytes: 2048 << 10,
                pss_bytes: 1024 << 10,
                private_bytes: 516 << 10,
                private_dirty_bytes: 512 << 10,
            }
        );
        assert_eq!(parse_smaps(smaps, &[0x1000]), MappingUsage::default());
        // Live: a fresh guest mapping with ten touched pages holds them privately.
        let mem = crate::layout::create_guest_memory(16).unwrap();
        for i in 0..10u64 {
            mem.write_obj(1u8, GuestAddress(i * 4096)).unwrap();
        }
        let live = guest_mapping_usage(&mem);
        assert!(live.rss_bytes >= 10 * 4096, "{live:?}");
        assert!(live.private_bytes >= 10 * 4096, "{live:?}");
        assert!(process_pss_bytes() >= live.pss_bytes);
    }
}

//! Tiny guest programs under KVM (test layer 2): each is a few instructions,
//! assembled here by a minimal assembler whose every instruction is documented,
//! booted through `BootSource::RawCode`. They exercise PIO (UART, i8042,
//! unclaimed ports), MMIO (boot timer, unmapped addresses), triple faults,
//! host stops and timeouts, in real, protected and long mode.
//!
//! Without `/dev/kvm` each test prints `SKIPPED <test>: <reason>` and returns,
//! or fails under `OSSO_REQUIRE_E2E=1` (see `osso_testkit`).

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use common::{elf_kernel, Console};
use osso_vmm::layout::BOOT_TIMER_ADDR;
use osso_vmm::{CpuMode, ExitReason, MachineBuilder, RunOutcome, VmConfig};

/// Where the test programs are loaded and entered.
const LOAD: u64 = 0x1000;

/// The handful of x86 instructions the test guests need, encoded for one mode.
struct Asm {
    mode: CpuMode,
    code: Vec<u8>,
}

impl Asm {
    fn new(mode: CpuMode) -> Self {
        Asm {
            mode,
            code: Vec::new(),
        }
    }

    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.code.extend_from_slice(b);
        self
    }

    /// `mov dx, imm16` — BA iw (with the 66 operand-size prefix outside real mode).
    fn mov_dx(&mut self, v: u16) -> &mut Self {
        if self.mode != CpuMode::Real {
            self.code.push(0x66);
        }
        self.code.push(0xba);
        self.bytes(&v.to_le_bytes())
    }

    /// `mov al, imm8` (B0 ib) then `out dx, al` (EE): one byte to port DX.
    fn out_dx_byte(&mut self, b: u8) -> &mut Self {
        self.bytes(&[0xb0, b, 0xee])
    }

    /// `mov dx, 0x3f8`, then one `mov al, c; out dx, al` per character: the
    /// string goes out of the UART's transmit register.
    fn print(&mut self, s: &str) -> &mut Self {
        self.mov_dx(0x3f8);
        for b in s.bytes() {
            self.out_dx_byte(b);
        }
        self
    }

    /// `mov eax, imm32` — B8 id (zero-extends into RAX in long mode).
    fn mov_eax(&mut self, v: u32) -> &mut Self {
        assert_ne!(self.mode, CpuMode::Real);
        self.code.push(0xb8);
        self.bytes(&v.to_le_bytes())
    }

    /// `mov eax, addr` (B8 id) then `mov dword [eax/rax], imm32` (C7 00 id):
    /// a 32-bit store to an absolute address.
    fn store32(&mut self, addr: u32, v: u32) -> &mut Self {
        self.mov_eax(addr);
        self.bytes(&[0xc7, 0x00]);
        self.bytes(&v.to_le_bytes())
    }

    /// `mov eax, addr` (B8 id) then `mov eax, [eax/rax]` (8B 00): a 32-bit load.
    fn load32(&mut self, addr: u32) -> &mut Self {
        self.mov_eax(addr);
        self.bytes(&[0x8b, 0x00])
    }

    /// `cmp eax, imm32` — 3D id.
    fn cmp_eax(&mut self, v: u32) -> &mut Self {
        self.code.push(0x3d);
        self.bytes(&v.to_le_bytes())
    }

    /// `jne rel8` — 75 cb: skips the next `n` bytes when not equal.
    fn jne_skip(&mut self, n: u8) -> &mut Self {
        self.bytes(&[0x75, n])
    }

    /// `jne +7` (75 07) then `print(c)` (7 bytes outside real mode): prints
    /// `c` only when the preceding compare found equality.
    fn print_if_equal(&mut self, c: char) -> &mut Self {
        assert_ne!(self.mode, CpuMode::Real);
        self.jne_skip(7).print(&c.to_string())
    }

    /// `mov ax, cs` (66 8C C8) then `cmp ax, imm8` (66 83 F8 ib).
    fn cmp_cs(&mut self, selector: u8) -> &mut Self {
        self.bytes(&[0x66, 0x8c, 0xc8, 0x66, 0x83, 0xf8, selector])
    }

    /// `in al, imm8` — E4 ib.
    fn in_al(&mut self, port: u8) -> &mut Self {
        self.bytes(&[0xe4, port])
    }

    /// `mov al, 0xfe` (B0 FE) then `out 0x64, al` (E6 64): the i8042 "pulse
    /// reset line" command, i.e. `reboot=k`.
    fn i8042_reset(&mut self) -> &mut Self {
        self.bytes(&[0xb0, 0xfe, 0xe6, 0x64])
    }

    /// `jmp $` — EB FE: spin for ever.
    fn spin(&mut self) -> &mut Self {
        self.bytes(&[0xeb, 0xfe])
    }

    /// `ud2` — 0F 0B: an invalid-opcode exception.
    fn ud2(&mut self) -> &mut Self {
        self.bytes(&[0x0f, 0x0b])
    }

    fn config(&self, console: &Console) -> VmConfig {
        let mut c = VmConfig::raw_code(self.code.clone(), LOAD, LOAD, self.mode);
        c.console = Box::new(console.clone());
        c.timeout = Some(Duration::from_secs(20));
        c
    }
}

fn run(asm: &Asm) -> (RunOutcome, Console) {
    let console = Console::default();
    let out = osso_vmm::run(asm.config(&console)).expect("machine runs");
    (out, console)
}

#[test]
fn uart_output_reaches_the_host_in_protected_mode() {
    if !osso_testkit::require_kvm("uart_output_reaches_the_host_in_protected_mode") {
        return;
    }
    let mut a = Asm::new(CpuMode::Protected32);
    a.print("Hello from a tiny guest\n").i8042_reset().spin();
    let (out, console) = run(&a);
    assert_eq!(console.text(), "Hello from a tiny guest\n");
    assert_eq!(out.exit, ExitReason::Reset, "i8042 reset ends the VM");
    assert!(out.exit.guest_ended_by_itself());
    let m = &out.metrics;
    assert_eq!(m.boot_protocol, "raw-code");
    assert!(m.first_kvm_run_us.is_some());
    assert!(m.end_us >= m.first_kvm_run_us.unwrap());
    assert!(
        m.guest_resident_bytes >= 4096,
        "the loaded page is resident"
    );
    assert!(m.vmm_rss_bytes > 0 && m.process_rss_bytes >= m.vmm_rss_bytes);
    assert_eq!(m.boot_timer_us, None);
}

#[test]
fn a_machine_built_for_a_restore_does_not_boot() {
    if !osso_testkit::require_kvm("a_machine_built_for_a_restore_does_not_boot") {
        return;
    }
    let mut config = VmConfig::new(osso_vmm::BootSource::Restored);
    config.mem_mib = 16;
    let builder = MachineBuilder::new(config).expect("a VM and its RAM");
    match builder.start() {
        Err(osso_vmm::VmmError::NothingToBoot) => {}
        Err(e) => panic!("another error: {e}"),
        Ok(_) => panic!("a machine with nothing to boot started"),
    }
}

#[test]
fn uart_output_in_real_mode() {
    if !osso_testkit::require_kvm("uart_output_in_real_mode") {
        return;
    }
    let mut a = Asm::new(CpuMode::Real);
    a.print("real\n").i8042_reset().spin();
    let (out, console) = run(&a);
    assert_eq!(console.text(), "real\n");
    assert_eq!(out.exit, ExitReason::Reset);
}

#[test]
fn uart_output_in_long_mode() {
    if !osso_testkit::require_kvm("uart_output_in_long_mode") {
        return;
    }
    // Long mode needs the GDT and the identity page tables the VMM writes.
    let mut a = Asm::new(CpuMode::Long64);
    a.print("long\n")
        .store32(BOOT_TIMER_ADDR as u32, 123)
        .i8042_reset()
        .spin();
    let (out, console) = run(&a);
    assert_eq!(console.text(), "long\n");
    assert_eq!(out.exit, ExitReason::Reset);
    assert!(out.metrics.boot_timer_us.is_some());
}

#[test]
fn console_input_reaches_the_guest() {
    if !osso_testkit::require_kvm("console_input_reaches_the_guest") {
        return;
    }
    let mut a = Asm::new(CpuMode::Protected32);
    a.mov_dx(0x3fd) // the UART's line status register
        .bytes(&[0xec]) // wait: in al, dx
        .bytes(&[0xa8, 0x01]) // test al, 1 (data ready?)
        .bytes(&[0x74, 0xfb]) // jz wait (back 5 bytes, to the `in`)
        .mov_dx(0x3f8) // the UART's data register
        .bytes(&[0xec]) // in al, dx: the byte the host sent
        .bytes(&[0xee]) // out dx, al: echo it
        .out_dx_byte(b'\n')
        .i8042_reset()
        .spin();
    let console = Console::default();
    let machine = MachineBuilder::new(a.config(&console))
        .unwrap()
        .start()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while machine.send_console_input(b"Q") == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = machine.wait();
    assert_eq!(out.exit, ExitReason::Reset);
    assert_eq!(console.text(), "Q\n");
}

/// An MMIO device that records writes and answers reads with a constant.
#[derive(Default)]
struct Probe {
    writes: Mutex<Vec<(u64, Vec<u8>)>>,
}

impl osso_vmm::BusDevice for Probe {
    fn read(&self, offset: u64, data: &mut [u8]) {
        // The virtio-mmio magic value at offset 0, zero elsewhere.
        let v: u32 = if offset == 0 { 0x7472_6976 } else { 0 };
        for (i, b) in data.iter_mut().enumerate() {
            *b = v.to_le_bytes().get(i).copied().unwrap_or(0);
        }
    }
    fn write(&self, offset: u64, data: &[u8]) {
        self.writes.lock().unwrap().push((offset, data.to_vec()));
    }
}

#[test]
fn mmio_device_slot_irq_cmdline_and_ioeventfd() {
    if !osso_testkit::require_kvm("mmio_device_slot_irq_cmdline_and_ioeventfd") {
        return;
    }
    // The first virtio-mmio slot is at a fixed address (see `layout`).
    let base = osso_vmm::layout::VIRTIO_MMIO_BASE as u32;
    let mut a = Asm::new(CpuMode::Protected32);
    a.load32(base) // read the magic value from the device
        .cmp_eax(0x7472_6976)
        .jne_skip(7) // skip `print("M")` (7 bytes) when it is wrong
        .print("M")
        .store32(base + 0x70, 0xabcd) // a register write: a vCPU exit
        .store32(base + 0x50, 1) // QueueNotify = 1: caught by the ioeventfd
        .print("\n")
        .i8042_reset()
        .spin();
    let console = Console::default();
    let mut cfg = a.config(&console);
    cfg.pvm_workaround = Some(false);
    let mut builder = MachineBuilder::new(cfg).unwrap();
    let probe = Arc::new(Probe::default());
    let slot = builder.add_virtio_mmio_device(probe.clone()).unwrap();
    assert_eq!(
        (slot.addr, slot.len, slot.irq),
        (u64::from(base), 0x1000, 5)
    );
    let second = builder.allocate_mmio_slot().unwrap();
    assert_eq!((second.addr, second.irq), (0xd000_1000, 6));
    let line = builder.kernel_cmdline().unwrap();
    assert!(
        line.contains("osso.boot_timer=0xc0000000 virtio_mmio.device=4K@0xd0000000:5"),
        "{line}"
    );
    assert!(!line.contains("noxsave"), "workaround forced off: {line}");
    // A device overlapping the slot is refused.
    assert!(builder
        .add_mmio_device_at(Arc::new(Probe::default()), slot.addr + 0x800, 0x1000)
        .is_err());
    // An irqfd on the slot's GSI and an ioeventfd on QueueNotify (0x50).
    let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    builder.register_irqfd(&irq, slot.irq).unwrap();
    let notify = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    builder
        .register_ioevent(&notify, slot.addr + 0x50, Some(1))
        .unwrap();
    let exit_evt = builder.exit_event().unwrap();
    assert!(exit_evt.read().is_err(), "not fired before the run");

    let out = builder.start().unwrap().wait();
    assert_eq!(out.exit, ExitReason::Reset);
    assert_eq!(console.text(), "M\n");
    assert_eq!(
        *probe.writes.lock().unwrap(),
        vec![(0x70, 0xabcdu32.to_le_bytes().to_vec())],
        "the notify went to the ioeventfd, not the device"
    );
    assert_eq!(notify.read().unwrap(), 1);
    assert_eq!(exit_evt.read().unwrap(), 1, "exit event fired");
}

#[test]
fn boot_timer_records_only_123() {
    if !osso_testkit::require_kvm("boot_timer_records_only_123") {
        return;
    }
    let mut a = Asm::new(CpuMode::Protected32);
    a.store32(BOOT_TIMER_ADDR as u32, 122) // wrong value: ignored
        .print("a")
        .store32(BOOT_TIMER_ADDR as u32, 123) // the ready mark
        .print("b")
        .i8042_reset()
        .spin();
    let (out, console) = run(&a);
    assert_eq!(console.text(), "ab");
    assert_eq!(out.exit, ExitReason::Reset);
    let m = &out.metrics;
    let t = m.boot_timer_us.expect("boot timer recorded");
    assert!(t >= m.first_kvm_run_us.unwrap() && t <= m.end_us, "{m:?}");

    // 122 alone is not a ready mark.
    let mut a = Asm::new(CpuMode::Protected32);
    a.store32(BOOT_TIMER_ADDR as u32, 122).i8042_reset().spin();
    let (out, _) = run(&a);
    assert_eq!(out.metrics.boot_timer_us, None);
}

#[test]
fn triple_fault_is_a_reset() {
    if !osso_testkit::require_kvm("triple_fault_is_a_reset") {
        return;
    }
    // The boot IDT holds one empty descriptor: #UD cannot be delivered, nor
    // the #GP/#DF that follow: a triple fault, which KVM reports as shutdown.
    let mut a = Asm::new(CpuMode::Protected32);
    a.print("x").ud2().print("never");
    let (out, console) = run(&a);
    assert_eq!(out.exit, ExitReason::Reset);
    assert_eq!(console.text(), "x");
}

#[test]
fn unmapped_mmio_and_pio_are_survived() {
    if !osso_testkit::require_kvm("unmapped_mmio_and_pio_are_survived") {
        return;
    }
    let mut a = Asm::new(CpuMode::Protected32);
    a.store32(0xe000_0000, 0x1234_5678) // write to nothing
        .in_al(0x99) // read an unclaimed port
        .load32(0xe000_0000) // read from nothing: all ones
        .cmp_eax(0xffff_ffff)
        // Skip `print("Y")` when the read was not all ones: it is 7 bytes,
        // `66 BA F8 03` (mov dx) + `B0 59 EE` (mov al / out).
        .jne_skip(7)
        .print("Y")
        .print("!\n")
        .i8042_reset()
        .spin();
    let (out, console) = run(&a);
    assert_eq!(out.exit, ExitReason::Reset);
    assert_eq!(
        console.text(),
        "Y!\n",
        "the guest went on after the unmapped accesses"
    );
}

#[test]
fn host_stop_ends_a_spinning_guest_promptly() {
    if !osso_testkit::require_kvm("host_stop_ends_a_spinning_guest_promptly") {
        return;
    }
    let mut a = Asm::new(CpuMode::Protected32);
    a.print("spin\n").spin();
    let console = Console::default();
    let mut cfg = a.config(&console);
    cfg.timeout = Some(Duration::from_secs(60));
    let machine = MachineBuilder::new(cfg).unwrap().start().unwrap();
    let stop = machine.stop_handle();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        stop.stop();
        t
    });
    assert_eq!(machine.exit_reason(), None, "still spinning");
    assert_eq!(
        machine.wait_for_exit(Duration::from_secs(30)),
        Some(ExitReason::Stopped)
    );
    let out = machine.wait();
    let asked = stopper.join().unwrap();
    let took = asked.elapsed();
    assert_eq!(out.exit, ExitReason::Stopped);
    assert!(took < Duration::from_secs(2), "stop took {took:?}");
    assert_eq!(console.text(), "spin\n");
    assert!(!out.exit.guest_ended_by_itself());
}

#[test]
fn timeout_fires() {
    if !osso_testkit::require_kvm("timeout_fires") {
        return;
    }
    let mut a = Asm::new(CpuMode::Protected32);
    a.spin();
    let console = Console::default();
    let mut cfg = a.config(&console);
    cfg.timeout = Some(Duration::from_millis(300));
    let t = Instant::now();
    let out = osso_vmm::run(cfg).unwrap();
    assert_eq!(out.exit, ExitReason::Timeout);
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(out.metrics.end_us >= 300_000);
}

#[test]
fn two_vcpus_boot_on_the_bsp() {
    if !osso_testkit::require_kvm("two_vcpus_boot_on_the_bsp") {
        return;
    }
    let mut a = Asm::new(CpuMode::Protected32);
    a.print("smp\n").i8042_reset().spin();
    let console = Console::default();
    let mut cfg = a.config(&console);
    cfg.vcpus = 2;
    let out = osso_vmm::run(cfg).unwrap();
    assert_eq!(out.exit, ExitReason::Reset);
    assert_eq!(console.text(), "smp\n");
}

#[test]
fn bad_configs_are_refused_before_running() {
    // All of these are refused before KVM is touched: no KVM needed.
    let mut cfg = VmConfig::raw_code(vec![0xf4], LOAD, LOAD, CpuMode::Real);
    cfg.vcpus = 0;
    assert!(MachineBuilder::new(cfg)
        .unwrap_err()
        .to_string()
        .contains("vCPUs"));
    let mut cfg = VmConfig::raw_code(vec![0xf4], LOAD, LOAD, CpuMode::Real);
    cfg.mem_mib = 1 << 20;
    let e = MachineBuilder::new(cfg).unwrap_err().to_string();
    assert!(e.contains("1048576 MiB"), "{e}");
    let cfg = VmConfig::kernel("/nonexistent/vmlinux", None);
    let e = MachineBuilder::new(cfg).unwrap_err().to_string();
    assert!(e.contains("/nonexistent/vmlinux"), "{e}");
}

/// A minimal bzImage: one setup sector with a boot protocol 2.15 header, then
/// `payload` as the protected-mode kernel, loaded at 1 MiB.
fn bzimage_kernel(payload: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; 2 * 512];
    b[0x1f1] = 1; // setup_sects
    b[0x1f4..0x1f8].copy_from_slice(&(payload.len() as u32 / 16).to_le_bytes()); // syssize
    b[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes()); // boot_flag
    b[0x202..0x206].copy_from_slice(b"HdrS");
    b[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // version
    b[0x211] = 1; // loadflags: LOADED_HIGH
    b[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    b[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    b[0x260..0x264].copy_from_slice(&0x10_0000u32.to_le_bytes()); // init_size
    b.extend_from_slice(payload);
    b
}

fn boot_file(bytes: &[u8]) -> (RunOutcome, Console) {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(bytes).unwrap();
    f.flush().unwrap();
    let console = Console::default();
    let mut cfg = VmConfig::kernel(f.path(), None);
    cfg.console = Box::new(console.clone());
    cfg.timeout = Some(Duration::from_secs(20));
    let out = osso_vmm::run(cfg).expect("machine runs");
    (out, console)
}

#[test]
fn pvh_entry_gets_start_info_and_cmdline() {
    if !osso_testkit::require_kvm("pvh_entry_gets_start_info_and_cmdline") {
        return;
    }
    // Entered in 32-bit protected mode with EBX = hvm_start_info.
    let mut a = Asm::new(CpuMode::Protected32);
    a.bytes(&[0x8b, 0x03]) // mov eax, [ebx]: start_info.magic
        .cmp_eax(0x336e_c578)
        .print_if_equal('S')
        .bytes(&[0x8b, 0x43, 0x18]) // mov eax, [ebx+0x18]: cmdline_paddr (low half)
        .bytes(&[0x8b, 0x00]) // mov eax, [eax]: its first 4 bytes
        .cmp_eax(u32::from_le_bytes(*b"cons"))
        .print_if_equal('L')
        .cmp_cs(0x10) // CS is the boot GDT's code selector
        .print_if_equal('C')
        .print("\n")
        .i8042_reset()
        .spin();
    let (out, console) = boot_file(&elf_kernel(0x20_0000, &a.code, Some(0x20_0000)));
    assert_eq!(console.text(), "SLC\n");
    assert_eq!(out.exit, ExitReason::Reset);
    assert_eq!(out.metrics.boot_protocol, "pvh");
}

#[test]
fn elf_without_pvh_note_gets_the_64bit_entry() {
    if !osso_testkit::require_kvm("elf_without_pvh_note_gets_the_64bit_entry") {
        return;
    }
    // Entered in long mode with RSI = the zero page.
    let mut a = Asm::new(CpuMode::Long64);
    a.bytes(&[0x8b, 0x86, 0x02, 0x02, 0x00, 0x00]) // mov eax, [rsi+0x202]: hdr.header
        .cmp_eax(u32::from_le_bytes(*b"HdrS"))
        .print_if_equal('Z')
        .cmp_cs(0x10) // __BOOT_CS
        .print_if_equal('C')
        .print("\n")
        .i8042_reset()
        .spin();
    let (out, console) = boot_file(&elf_kernel(0x20_0000, &a.code, None));
    assert_eq!(console.text(), "ZC\n");
    assert_eq!(out.exit, ExitReason::Reset);
    assert_eq!(out.metrics.boot_protocol, "linux-64bit");
}

#[test]
fn bzimage_gets_the_64bit_entry_at_load_plus_0x200() {
    if !osso_testkit::require_kvm("bzimage_gets_the_64bit_entry_at_load_plus_0x200") {
        return;
    }
    let mut a = Asm::new(CpuMode::Long64);
    a.bytes(&[0x8b, 0x86, 0x02, 0x02, 0x00, 0x00]) // mov eax, [rsi+0x202]: hdr.header
        .cmp_eax(u32::from_le_bytes(*b"HdrS"))
        .print_if_equal('Z')
        .bytes(&[0x8b, 0x86, 0x28, 0x02, 0x00, 0x00]) // mov eax, [rsi+0x228]: cmd_line_ptr
        .bytes(&[0x8b, 0x00]) // mov eax, [rax]: its first 4 bytes
        .cmp_eax(u32::from_le_bytes(*b"cons"))
        .print_if_equal('L')
        .cmp_cs(0x10) // __BOOT_CS
        .print_if_equal('C')
        .print("\n")
        .i8042_reset()
        .spin();
    // 0x200 bytes of `hlt` (F4) before the 64-bit entry: landing there would
    // hang the test (and time out), not pass it.
    let mut payload = vec![0xf4u8; 0x200];
    payload.extend_from_slice(&a.code);
    payload.resize(payload.len().next_multiple_of(16), 0xf4);
    let (out, console) = boot_file(&bzimage_kernel(&payload));
    assert_eq!(console.text(), "ZLC\n");
    assert_eq!(out.exit, ExitReason::Reset);
    assert_eq!(out.metrics.boot_protocol, "linux-64bit");
}

//! Guest physical memory layout (x86_64) and guest RAM creation.
//!
//! ```text
//! 0x0000_0000  real-mode IVT / BIOS data area (left zero)
//! 0x0000_0500  boot GDT (5 entries), boot IDT at 0x540 (one empty entry)
//! 0x0000_6000  PVH `hvm_start_info`, its memory map at 0x6100, module list at 0x6800
//! 0x0000_7000  Linux boot protocol zero page (`boot_params`)
//! 0x0000_8ff0  initial stack pointer for the 64-bit entry
//! 0x0000_9000  identity page tables: PML4 0x9000, PDPT 0xa000, PDs 0xb000-0xefff (4 GiB, 2 MiB pages)
//! 0x0002_0000  kernel command line (at most 2048 bytes with its NUL)
//! 0x0009_fc00  Intel MP table (floating pointer + configuration table, EBDA, 1 KiB)
//! 0x000a_0000  legacy VGA / BIOS hole (not RAM in the memory map)
//! 0x0010_0000  high memory: kernel (bzImage at 1 MiB, vmlinux at its own p_paddr)
//!   ...        initrd at the top of RAM, page aligned
//! RAM end      (at most 0xc000_0000: 3 GiB, the 32-bit MMIO gap begins there)
//! 0xc000_0000  boot timer (one 4 KiB page; the guest writes 123 at offset 0)
//! 0xd000_0000  virtio-mmio window: one 4 KiB slot per device, 32 slots,
//!              IRQs 5 upward (one per slot); the UART has IRQ 4
//! 0xfec0_0000  IOAPIC (in-kernel)
//! 0xfee0_0000  local APIC (in-kernel)
//! 0xfffb_c000  KVM identity map page, then 0xfffb_d000 KVM TSS (3 pages)
//! ```
//!
//! Guest RAM is a single region from GPA 0; sizes below [`MIN_MEM_MIB`] or above
//! [`MAX_MEM_MIB`] are refused.

use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Smallest guest RAM accepted, in MiB.
pub const MIN_MEM_MIB: u64 = 8;
/// Largest guest RAM accepted, in MiB: RAM must end below the 32-bit MMIO gap.
pub const MAX_MEM_MIB: u64 = MMIO_GAP_START >> 20;

/// Boot GDT address.
pub const BOOT_GDT_ADDR: u64 = 0x500;
/// Boot IDT address (an empty IDT).
pub const BOOT_IDT_ADDR: u64 = 0x540;
/// PVH `hvm_start_info` address.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// PVH memory map table address.
pub const PVH_MEMMAP_ADDR: u64 = 0x6100;
/// PVH module list address.
pub const PVH_MODLIST_ADDR: u64 = 0x6800;
/// Linux boot protocol zero page address.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer for the 64-bit boot entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// PML4 address of the boot identity page tables.
pub const PML4_ADDR: u64 = 0x9000;
/// PDPT address.
pub const PDPT_ADDR: u64 = 0xa000;
/// First page directory address (four, one per GiB).
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line address.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Largest command line, NUL included (x86 `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area, where the MP table lives.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of the legacy hole (VGA, option ROMs, BIOS).
pub const LEGACY_HOLE_START: u64 = 0xa0000;
/// Start of high memory (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO gap: RAM never reaches it.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// Boot timer device address.
pub const BOOT_TIMER_ADDR: u64 = 0xc000_0000;
/// Boot timer device size.
pub const BOOT_TIMER_SIZE: u64 = 0x1000;
/// First virtio-mmio slot.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio slot.
pub const VIRTIO_MMIO_SLOT_SIZE: u64 = 0x1000;
/// Number of virtio-mmio slots.
pub const VIRTIO_MMIO_SLOTS: u64 = 32;
/// First IRQ (GSI) handed to MMIO devices.
pub const FIRST_DEVICE_IRQ: u32 = 5;
/// Last IRQ (GSI) an MMIO device can get (IOAPIC has 24 pins).
pub const LAST_DEVICE_IRQ: u32 = 23;
/// Number of IOAPIC pins.
pub const IOAPIC_PINS: u32 = 24;
/// IOAPIC base address.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Local APIC base address.
pub const APIC_ADDR: u64 = 0xfee0_0000;
/// KVM identity map page (required by VMX before the TSS).
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
/// KVM TSS address (three pages).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;

/// UART (COM1) port base.
pub const SERIAL_PORT: u16 = 0x3f8;
/// UART IRQ.
pub const SERIAL_IRQ: u32 = 4;
/// i8042 data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// i8042 command/status port.
pub const I8042_CMD_PORT: u16 = 0x64;

/// Errors about the memory layout.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// Memory size outside what the layout can hold.
    #[error("guest memory of {mib} MiB is not supported: it must be between {min} and {max} MiB")]
    BadMemorySize {
        /// The requested size.
        mib: u64,
        /// The smallest size accepted.
        min: u64,
        /// The largest size accepted.
        max: u64,
    },
    /// mmap of guest memory failed.
    #[error("cannot allocate {mib} MiB of guest memory: {source}")]
    Alloc {
        /// The requested size.
        mib: u64,
        /// The cause.
        source: vm_memory::mmap::FromRangesError,
    },
}

// The layout's regions do not overlap (checked at compile time).
const _: () = {
    assert!(BOOT_GDT_ADDR + 5 * 8 <= BOOT_IDT_ADDR);
    assert!(PVH_MEMMAP_ADDR > PVH_INFO_ADDR + 56);
    assert!(PVH_MODLIST_ADDR > PVH_MEMMAP_ADDR + 8 * 24);
    assert!(PVH_MODLIST_ADDR + 32 <= ZERO_PAGE_ADDR);
    assert!(BOOT_STACK_POINTER < PML4_ADDR);
    assert!(PD_ADDR + 4 * 0x1000 <= CMDLINE_ADDR);
    assert!(CMDLINE_ADDR + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
    assert!(EBDA_START + 1024 <= LEGACY_HOLE_START);
    assert!(MAX_MEM_MIB << 20 <= MMIO_GAP_START);
    assert!(BOOT_TIMER_ADDR + BOOT_TIMER_SIZE <= VIRTIO_MMIO_BASE);
    assert!(VIRTIO_MMIO_BASE + VIRTIO_MMIO_SLOTS * VIRTIO_MMIO_SLOT_SIZE < IOAPIC_ADDR);
    assert!(LAST_DEVICE_IRQ < IOAPIC_PINS);
};

/// Checks a guest RAM size against the layout; returns the size in bytes.
pub fn validate_mem_mib(mib: u64) -> Result<u64, LayoutError> {
    if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&mib) {
        return Err(LayoutError::BadMemorySize {
            mib,
            min: MIN_MEM_MIB,
            max: MAX_MEM_MIB,
        });
    }
    Ok(mib << 20)
}

/// Creates guest RAM: one anonymous mapping from GPA 0.
pub fn create_guest_memory(mib: u64) -> Result<GuestMemoryMmap, LayoutError> {
    let bytes = validate_mem_mib(mib)?;
    // validate_mem_mib bounds the size to 3 GiB, which fits usize on x86_64.
    let size = usize::try_from(bytes).unwrap_or(usize::MAX);
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)])
        .map_err(|source| LayoutError::Alloc { mib, source })
}

/// Address of a virtio-mmio slot, or `None` past the last slot.
pub fn virtio_mmio_slot_addr(slot: u32) -> Option<u64> {
    if u64::from(slot) >= VIRTIO_MMIO_SLOTS {
        return None;
    }
    Some(VIRTIO_MMIO_BASE + u64::from(slot) * VIRTIO_MMIO_SLOT_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    #[test]
    fn memory_size_validation() {
        assert!(matches!(
            validate_mem_mib(0),
            Err(LayoutError::BadMemorySize { mib: 0, .. })
        ));
        assert!(validate_mem_mib(MIN_MEM_MIB - 1).is_err());
        assert_eq!(validate_mem_mib(MIN_MEM_MIB).unwrap(), MIN_MEM_MIB << 20);
        assert_eq!(validate_mem_mib(128).unwrap(), 128 << 20);
        assert_eq!(validate_mem_mib(3072).unwrap(), 3 << 30);
        let e = validate_mem_mib(3073).unwrap_err().to_string();
        assert!(e.contains("3073 MiB"), "{e}");
        assert!(validate_mem_mib(u64::MAX).is_err());
    }

    #[test]
    fn guest_memory_is_one_region_from_zero() {
        let m = create_guest_memory(16).unwrap();
        assert_eq!(m.num_regions(), 1);
        assert_eq!(m.last_addr(), GuestAddress((16 << 20) - 1));
    }

    #[test]
    fn layout_is_consistent() {
        assert_eq!(virtio_mmio_slot_addr(1), Some(0xd000_1000));
        assert_eq!(virtio_mmio_slot_addr(32), None);
    }
}

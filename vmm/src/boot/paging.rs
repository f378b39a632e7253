//! Identity page tables for the 64-bit entry: the first 4 GiB mapped with
//! 2 MiB pages (PML4 -> four PDPT entries -> four PDs of 512 large pages).
//! That covers the kernel, the zero page, the command line and the boot stack
//! as the Linux 64-bit boot protocol requires, and the MMIO gap (boot timer,
//! virtio-mmio slots) for raw-code guests.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{PDPT_ADDR, PD_ADDR, PML4_ADDR};

/// Present + writable.
const PRESENT_RW: u64 = 0x3;
/// Present + writable + page size (2 MiB).
const PRESENT_RW_PS: u64 = 0x83;

/// Number of page directories (1 GiB each).
pub const PD_COUNT: u64 = 4;

/// The tables as (address, 512 entries): PML4, PDPT, then the PDs.
pub fn identity_tables() -> Vec<(u64, Vec<u64>)> {
    let mut pml4 = vec![0u64; 512];
    pml4[0] = PDPT_ADDR | PRESENT_RW;
    let mut pdpt = vec![0u64; 512];
    let mut tables = Vec::new();
    for g in 0..PD_COUNT {
        let pd_addr = PD_ADDR + g * 0x1000;
        pdpt[g as usize] = pd_addr | PRESENT_RW;
        let pd: Vec<u64> = (0..512u64)
            .map(|i| (((g << 9) + i) << 21) | PRESENT_RW_PS)
            .collect();
        tables.push((pd_addr, pd));
    }
    tables.insert(0, (PDPT_ADDR, pdpt));
    tables.insert(0, (PML4_ADDR, pml4));
    tables
}

/// Writes the identity tables into guest memory; returns the CR3 value.
pub fn write_identity_tables(mem: &GuestMemoryMmap) -> Result<u64, vm_memory::GuestMemoryError> {
    for (addr, entries) in identity_tables() {
        let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
        mem.write_slice(&bytes, GuestAddress(addr))?;
    }
    Ok(PML4_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_map_first_4_gib() {
        let mem = crate::layout::create_guest_memory(8).unwrap();
        assert_eq!(write_identity_tables(&mem).unwrap(), 0x9000);
        let pml4_0: u64 = mem.read_obj(GuestAddress(0x9000)).unwrap();
        assert_eq!(pml4_0, 0xa003);
        let pml4_1: u64 = mem.read_obj(GuestAddress(0x9008)).unwrap();
        assert_eq!(pml4_1, 0);
        let pdpt_0: u64 = mem.read_obj(GuestAddress(0xa000)).unwrap();
        assert_eq!(pdpt_0, 0xb003);
        let pdpt_3: u64 = mem.read_obj(GuestAddress(0xa018)).unwrap();
        assert_eq!(pdpt_3, 0xe003);
        let pdpt_4: u64 = mem.read_obj(GuestAddress(0xa020)).unwrap();
        assert_eq!(pdpt_4, 0);
        for i in [0u64, 1, 100, 511, 512, 1536, 2047] {
            let pde: u64 = mem.read_obj(GuestAddress(0xb000 + i * 8)).unwrap();
            assert_eq!(pde, (i << 21) | 0x83, "PD entry {i}");
        }
        // 0xc000_0000 (boot timer) is mapped to itself.
        let pde: u64 = mem
            .read_obj(GuestAddress(0xb000 + (0xc000_0000u64 >> 21) * 8))
            .unwrap();
        assert_eq!(pde & !0xfff, 0xc000_0000);
    }
}

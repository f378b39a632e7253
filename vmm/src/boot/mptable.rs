//! Intel MultiProcessor Specification 1.4 table, written into the EBDA.
//!
//! Without ACPI (Osso boots with none) the Linux kernel learns of its CPUs, its
//! local APICs and the IOAPIC only from an MP table (`CONFIG_X86_MPPARSE`);
//! without one, device interrupts never arrive. linux-loader does not write
//! one, so this module does: an MP floating pointer at [`EBDA_START`] (a place
//! the kernel scans: the last KiB below 640 KiB) followed by the configuration
//! table with one processor entry per vCPU, one ISA bus, the IOAPIC, one
//! interrupt entry per IOAPIC pin (ISA IRQ n -> pin n, matching KVM's default
//! GSI routing), and LINT0 = ExtINT, LINT1 = NMI.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{APIC_ADDR, EBDA_START, IOAPIC_ADDR, IOAPIC_PINS, LEGACY_HOLE_START};

/// The most vCPUs the table (1 KiB) has room for.
pub const MAX_CPUS: u8 = 32;

const MPC_SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
/// Family 6 (stepping/model/family signature).
const CPU_SIGNATURE: u32 = 0x600;
/// CPUID feature flags: FPU and APIC.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IOINT: u8 = 3;
const ENTRY_LINT: u8 = 4;

const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

/// MP table errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MptableError {
    /// Zero or too many vCPUs.
    #[error("the MP table supports 1 to {max} vCPUs, not {0}", max = MAX_CPUS)]
    BadCpuCount(u8),
    /// The table would not fit in the EBDA.
    #[error("the MP table ({0} bytes) does not fit below 640 KiB")]
    TooBig(usize),
    /// Guest memory write failed.
    #[error("cannot write the MP table to guest memory")]
    Write,
}

fn checksum(bytes: &[u8]) -> u8 {
    let sum = bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    0u8.wrapping_sub(sum)
}

/// Builds the floating pointer and configuration table for `cpus` vCPUs, to
/// live at `base`. Returns the bytes (pointer first, table right after).
pub fn build(cpus: u8, base: u64) -> Result<Vec<u8>, MptableError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(MptableError::BadCpuCount(cpus));
    }
    let table_addr = base + 16;
    let ioapic_id = cpus; // APIC IDs 0..cpus-1 are the CPUs.

    // Entries after the 44-byte header.
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        entries.push(ENTRY_PROCESSOR);
        entries.push(id); // local APIC id
        entries.push(APIC_VERSION);
        entries.push(CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 });
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]); // reserved
        count += 1;
    }
    // Bus 0: ISA.
    entries.push(ENTRY_BUS);
    entries.push(0);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    // The IOAPIC.
    entries.push(ENTRY_IOAPIC);
    entries.push(ioapic_id);
    entries.push(IOAPIC_VERSION);
    entries.push(1); // enabled
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    count += 1;
    // ISA IRQ n -> IOAPIC pin n, bus-default polarity and trigger.
    for pin in 0..IOAPIC_PINS as u8 {
        entries.push(ENTRY_IOINT);
        entries.push(INT_TYPE_INT);
        entries.extend_from_slice(&0u16.to_le_bytes()); // flags: conforms to bus
        entries.push(0); // source bus
        entries.push(pin); // source bus IRQ
        entries.push(ioapic_id);
        entries.push(pin);
        count += 1;
    }
    // Local interrupts: LINT0 = ExtINT (the PIC), LINT1 = NMI, on every CPU.
    for (kind, lint) in [(INT_TYPE_EXTINT, 0u8), (INT_TYPE_NMI, 1u8)] {
        entries.push(ENTRY_LINT);
        entries.push(kind);
        entries.extend_from_slice(&0u16.to_le_bytes());
        entries.push(0); // source bus
        entries.push(0); // source bus IRQ
        entries.push(0xff); // all local APICs
        entries.push(lint);
        count += 1;
    }

    let table_len = 44 + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(MPC_SPEC_REV);
    table.push(0); // checksum, below
    table.extend_from_slice(b"OSSOVMM ");
    table.extend_from_slice(b"OSSO MICROVM");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(APIC_ADDR as u32).to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0); // reserved
    debug_assert_eq!(table.len(), 44);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(MPC_SPEC_REV);
    fp.push(0); // checksum, below
    fp.extend_from_slice(&[0u8; 5]); // features: a configuration table is present
    fp[10] = checksum(&fp);

    fp.extend_from_slice(&table);
    if base + fp.len() as u64 > LEGACY_HOLE_START {
        return Err(MptableError::TooBig(fp.len()));
    }
    Ok(fp)
}

/// Writes the MP table for `cpus` vCPUs at [`EBDA_START`].
pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), MptableError> {
    let bytes = build(cpus, EBDA_START)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(|_| MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_contents() {
        for cpus in [1u8, 2, 32] {
            let b = build(cpus, EBDA_START).unwrap();
            assert_eq!(&b[0..4], b"_MP_");
            assert_eq!(sum(&b[0..16]), 0, "floating pointer checksum");
            let table_addr = u32::from_le_bytes(b[4..8].try_into().unwrap());
            assert_eq!(u64::from(table_addr), EBDA_START + 16);
            let t = &b[16..];
            assert_eq!(&t[0..4], b"PCMP");
            let len = u16::from_le_bytes([t[4], t[5]]) as usize;
            assert_eq!(len, t.len());
            assert_eq!(sum(t), 0, "configuration table checksum");
            let count = u16::from_le_bytes([t[34], t[35]]);
            assert_eq!(count as u32, u32::from(cpus) + 2 + IOAPIC_PINS + 2);
            assert_eq!(
                u32::from_le_bytes(t[36..40].try_into().unwrap()),
                0xfee0_0000
            );
            // First processor is the enabled BSP with APIC id 0.
            assert_eq!(&t[44..48], &[0, 0, APIC_VERSION, 3]);
            // The IOAPIC entry follows the CPUs and the bus.
            let io = 44 + 20 * cpus as usize + 8;
            assert_eq!(t[io], ENTRY_IOAPIC);
            assert_eq!(t[io + 1], cpus);
            assert_eq!(
                u32::from_le_bytes(t[io + 4..io + 8].try_into().unwrap()),
                0xfec0_0000
            );
            // IRQ 4 (the UART) goes to pin 4.
            let irq4 = io + 8 + 4 * 8;
            assert_eq!(&t[irq4..irq4 + 8], &[ENTRY_IOINT, 0, 0, 0, 0, 4, cpus, 4]);
            // LINT0 ExtINT, LINT1 NMI.
            let lint = t.len() - 16;
            assert_eq!(&t[lint..lint + 8], &[ENTRY_LINT, 3, 0, 0, 0, 0, 0xff, 0]);
            assert_eq!(&t[lint + 8..], &[ENTRY_LINT, 1, 0, 0, 0, 0, 0xff, 1]);
            assert!(EBDA_START + b.len() as u64 <= LEGACY_HOLE_START);
        }
    }

    #[test]
    fn bad_cpu_counts() {
        assert_eq!(build(0, EBDA_START), Err(MptableError::BadCpuCount(0)));
        assert_eq!(build(33, EBDA_START), Err(MptableError::BadCpuCount(33)));
    }

    #[test]
    fn written_to_guest_memory() {
        let mem = crate::layout::create_guest_memory(8).unwrap();
        write(&mem, 2).unwrap();
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(EBDA_START)).unwrap();
        assert_eq!(&sig, b"_MP_");
    }
}

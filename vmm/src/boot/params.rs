//! Boot parameters: the guest memory map (e820 types), the PVH
//! `hvm_start_info` with its memory map and module list, and the Linux boot
//! protocol zero page (`boot_params`) with its e820 table.

use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::layout::{
    CMDLINE_ADDR, EBDA_START, HIMEM_START, PVH_INFO_ADDR, PVH_MEMMAP_ADDR, PVH_MODLIST_ADDR,
    ZERO_PAGE_ADDR,
};

/// e820 type: usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type: reserved.
pub const E820_RESERVED: u32 = 2;

/// `hvm_start_info.magic`.
pub const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// `boot_params.hdr.boot_flag`.
pub const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `boot_params.hdr.header` ("HdrS").
pub const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader`: undefined loader.
pub const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Default kernel alignment (16 MiB) for a header we make ourselves.
pub const KERNEL_MIN_ALIGNMENT: u32 = 0x100_0000;

/// One memory map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemEntry {
    /// Start address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// e820 type.
    pub kind: u32,
}

/// The guest memory map for `mem_size` bytes of RAM: low RAM below the EBDA,
/// the EBDA and legacy hole reserved, high RAM from 1 MiB.
pub fn memory_map(mem_size: u64) -> Vec<MemEntry> {
    vec![
        MemEntry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        MemEntry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820_RESERVED,
        },
        MemEntry {
            addr: HIMEM_START,
            size: mem_size.saturating_sub(HIMEM_START),
            kind: E820_RAM,
        },
    ]
}

/// An initrd placed in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdPlacement {
    /// Guest address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Builds the PVH start info, memory map and module list.
pub fn pvh_params(mem_size: u64, initrd: Option<InitrdPlacement>) -> BootParams {
    let map = memory_map(mem_size);
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    let entries: Vec<hvm_memmap_table_entry> = map
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let modules: Vec<hvm_modlist_entry> = initrd
        .iter()
        .map(|i| hvm_modlist_entry {
            paddr: i.addr,
            size: i.size,
            cmdline_paddr: 0,
            reserved: 0,
        })
        .collect();
    if !modules.is_empty() {
        info.nr_modules = modules.len() as u32;
        info.modlist_paddr = PVH_MODLIST_ADDR;
    }
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_ADDR));
    params.set_sections(&entries, GuestAddress(PVH_MEMMAP_ADDR));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(PVH_MODLIST_ADDR));
    }
    params
}

/// Writes PVH parameters to guest memory.
pub fn write_pvh(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    initrd: Option<InitrdPlacement>,
) -> Result<(), linux_loader::configurator::Error> {
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&pvh_params(mem_size, initrd), mem)
}

/// Builds the Linux boot protocol zero page. `hdr` is the kernel's own setup
/// header (bzImage) or `None` (an ELF kernel entered at its 64-bit entry).
pub fn linux_boot_params(
    hdr: Option<setup_header>,
    mem_size: u64,
    cmdline_len: usize,
    initrd: Option<InitrdPlacement>,
) -> boot_params {
    let mut p = boot_params::default();
    if let Some(h) = hdr {
        p.hdr = h;
    } else {
        p.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        p.hdr.header = KERNEL_HDR_MAGIC;
        p.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    p.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    p.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    p.hdr.cmdline_size = cmdline_len as u32;
    if let Some(i) = initrd {
        p.hdr.ramdisk_image = i.addr as u32;
        p.hdr.ramdisk_size = i.size as u32;
    }
    let map = memory_map(mem_size);
    for (slot, e) in p.e820_table.iter_mut().zip(map.iter()) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    p.e820_entries = map.len() as u8;
    p
}

/// Writes the zero page to guest memory.
pub fn write_linux(
    mem: &GuestMemoryMmap,
    params: &boot_params,
) -> Result<(), linux_loader::configurator::Error> {
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(params, GuestAddress(ZERO_PAGE_ADDR)),
        mem,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn memory_map_contents() {
        let m = memory_map(128 << 20);
        assert_eq!(
            m,
            vec![
                MemEntry {
                    addr: 0,
                    size: 0x9fc00,
                    kind: E820_RAM
                },
                MemEntry {
                    addr: 0x9fc00,
                    size: 0x100000 - 0x9fc00,
                    kind: E820_RESERVED
                },
                MemEntry {
                    addr: 0x100000,
                    size: (128 << 20) - 0x100000,
                    kind: E820_RAM
                },
            ]
        );
    }

    #[test]
    fn zero_page_contents() {
        let initrd = InitrdPlacement {
            addr: 0x7f0_0000,
            size: 0x12345,
        };
        let p = linux_boot_params(None, 128 << 20, 100, Some(initrd));
        let hdr = p.hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ hdr.cmdline_size }, 100);
        assert_eq!({ hdr.ramdisk_image }, 0x7f0_0000);
        assert_eq!({ hdr.ramdisk_size }, 0x12345);
        assert_eq!(p.e820_entries, 3);
        let e = p.e820_table;
        assert_eq!(
            ({ e[0].addr }, { e[0].size }, { e[0].r#type }),
            (0, 0x9fc00, 1)
        );
        assert_eq!(({ e[1].addr }, { e[1].r#type }), (0x9fc00, 2));
        assert_eq!(
            ({ e[2].addr }, { e[2].size }, { e[2].r#type }),
            (0x100000, (128 << 20) - 0x100000, 1)
        );
        assert_eq!({ e[3].size }, 0);

        // A bzImage header is kept, with the loader fields overwritten.
        let mut own = setup_header {
            version: 0x20f,
            loadflags: 1,
            code32_start: 0x100000,
            ..Default::default()
        };
        own.type_of_loader = 0;
        let p = linux_boot_params(Some(own), 64 << 20, 10, None);
        let hdr = p.hdr;
        assert_eq!(
            ({ hdr.version }, { hdr.code32_start }, {
                hdr.type_of_loader
            }),
            (0x20f, 0x100000, 0xff)
        );
        assert_eq!(({ hdr.ramdisk_image }, { hdr.ramdisk_size }), (0, 0));

        let mem = crate::layout::create_guest_memory(128).unwrap();
        write_linux(&mem, &p).unwrap();
        let back: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        assert_eq!(back.e820_entries, 3);
        assert_eq!({ back.hdr.cmd_line_ptr }, 0x20000);
    }

    #[test]
    fn pvh_start_info_contents() {
        let mem = crate::layout::create_guest_memory(64).unwrap();
        let initrd = InitrdPlacement {
            addr: 0x3f0_0000,
            size: 0x1000,
        };
        write_pvh(&mem, 64 << 20, Some(initrd)).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_ADDR)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(info.version, 1);
        assert_eq!(info.cmdline_paddr, CMDLINE_ADDR);
        assert_eq!(
            (info.memmap_paddr, info.memmap_entries),
            (PVH_MEMMAP_ADDR, 3)
        );
        assert_eq!((info.nr_modules, info.modlist_paddr), (1, PVH_MODLIST_ADDR));
        let last: hvm_memmap_table_entry = mem
            .read_obj(GuestAddress(PVH_MEMMAP_ADDR + 2 * 24))
            .unwrap();
        assert_eq!(
            (last.addr, last.size, last.type_),
            (HIMEM_START, (64 << 20) - HIMEM_START, E820_RAM)
        );
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(PVH_MODLIST_ADDR)).unwrap();
        assert_eq!((module.paddr, module.size), (0x3f0_0000, 0x1000));
    }
}

//! Boot: kernel loading (ELF `vmlinux` through PVH, `bzImage` through the Linux
//! 64-bit boot protocol), the initrd, the command line, the MP table, and the
//! description of the CPU state the entry needs ([`BootEntry`]).
//!
//! A kernel file is recognised by its content: the ELF magic, or the bzImage
//! `HdrS` signature at 0x202. An ELF kernel with a PVH note is entered through
//! PVH (32-bit flat protected mode, paging off, EBX = `hvm_start_info`); one
//! without is entered at its 64-bit entry with a zero page. A bzImage is
//! entered at its 64-bit entry (load address + 0x200), RSI = zero page.
//! Raw code ([`BootSource::RawCode`]) is copied to a given address and entered
//! in the mode asked for: for tiny test guests and the SDK's tests.

pub mod cmdline;
pub mod gdt;
pub mod mptable;
pub mod paging;
pub mod params;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::{bzimage::BzImage, elf::Elf, elf::PvhBootCapability, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{
    BOOT_GDT_ADDR, BOOT_STACK_POINTER, CMDLINE_ADDR, HIMEM_START, PVH_INFO_ADDR, ZERO_PAGE_ADDR,
};
use params::InitrdPlacement;

/// The CPU mode at the entry point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuMode {
    /// 16-bit real mode, CS base 0.
    Real,
    /// 32-bit flat protected mode, paging off (the PVH entry).
    Protected32,
    /// 64-bit long mode with the identity page tables (the Linux 64-bit entry).
    Long64,
}

/// The boot protocol used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// PVH entry of an ELF `vmlinux`.
    Pvh,
    /// Linux 64-bit boot protocol (bzImage, or an ELF without a PVH note).
    Linux64,
    /// Raw code, no kernel.
    RawCode,
}

impl BootProtocol {
    /// A short name (`pvh`, `linux-64bit`, `raw-code`).
    pub fn name(&self) -> &'static str {
        match self {
            BootProtocol::Pvh => "pvh",
            BootProtocol::Linux64 => "linux-64bit",
            BootProtocol::RawCode => "raw-code",
        }
    }
}

/// What to boot.
#[derive(Clone, Debug)]
pub enum BootSource {
    /// A Linux kernel (ELF `vmlinux` or `bzImage`) and an optional initrd.
    Kernel {
        /// Kernel file.
        kernel: PathBuf,
        /// Initrd file.
        initrd: Option<PathBuf>,
    },
    /// Raw machine code, copied to `load_addr` and entered at `entry` in `mode`.
    /// No command line, no boot parameters; the MP table is still written.
    RawCode {
        /// The code.
        code: Vec<u8>,
        /// Where it is copied.
        load_addr: u64,
        /// Entry point (RIP; in real mode, with CS = 0).
        entry: u64,
        /// CPU mode at the entry.
        mode: CpuMode,
    },
    /// Nothing to load: guest RAM and the vCPUs' state come from a snapshot
    /// (`snapshot::restore`; the machine starts with
    /// `MachineBuilder::start_restored`).
    Restored,
}

/// Register state the boot vCPU starts with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootEntry {
    /// Protocol used.
    pub protocol: BootProtocol,
    /// CPU mode.
    pub mode: CpuMode,
    /// RIP.
    pub rip: u64,
    /// RSI (zero page for the Linux protocol).
    pub rsi: u64,
    /// RBX (`hvm_start_info` for PVH).
    pub rbx: u64,
    /// RSP.
    pub rsp: u64,
}

/// Errors while loading what is to be booted. Every message names the problem.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A file could not be opened or read.
    #[error("cannot read {what} {path}: {source}")]
    Io {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Neither ELF nor bzImage.
    #[error("kernel {0} is neither an ELF vmlinux nor a bzImage")]
    UnknownKernelFormat(PathBuf),
    /// An ELF that is not a 64-bit x86 executable.
    #[error("kernel {path} is not a 64-bit x86 ELF: {why}")]
    BadElf {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The file ends before the image it describes.
    #[error("kernel {path} is truncated: it is {actual} bytes, its headers need {needed}")]
    TruncatedKernel {
        /// The file.
        path: PathBuf,
        /// Bytes the headers need.
        needed: u64,
        /// Bytes in the file.
        actual: u64,
    },
    /// The kernel does not fit in guest RAM.
    #[error(
        "kernel {path} needs guest memory up to {end:#x} but the guest has {mem_size:#x} bytes"
    )]
    KernelTooBig {
        /// The file.
        path: PathBuf,
        /// End of the kernel image in guest memory.
        end: u64,
        /// Guest RAM size.
        mem_size: u64,
    },
    /// linux-loader refused the kernel.
    #[error("cannot load kernel {path}: {source}")]
    Loader {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: linux_loader::loader::Error,
    },
    /// The initrd does not fit between the kernel and the top of RAM.
    #[error("initrd {path} ({size} bytes) does not fit in guest memory: {room} bytes free between the kernel end {kernel_end:#x} and the top of RAM")]
    InitrdTooBig {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Room available.
        room: u64,
        /// End of the kernel.
        kernel_end: u64,
    },
    /// The command line is bad.
    #[error(transparent)]
    Cmdline(#[from] cmdline::CmdlineError),
    /// Boot parameters could not be written.
    #[error("cannot write boot parameters: {0}")]
    Params(String),
    /// The MP table could not be written.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// Raw code does not fit in guest memory.
    #[error("raw code of {len} bytes at {addr:#x} does not fit in guest memory")]
    RawCodeTooBig {
        /// Load address.
        addr: u64,
        /// Code size.
        len: usize,
    },
    /// Guest memory write failed.
    #[error("guest memory write failed: {0}")]
    Memory(String),
}

/// Kernel file formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// ELF `vmlinux`.
    Elf,
    /// `bzImage`.
    BzImage,
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> BootError + 'a {
    move |source| BootError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn read_at(file: &mut File, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
    file.seek(SeekFrom::Start(offset))?;
    let mut done = 0;
    while done < buf.len() {
        match file.read(&mut buf[done..])? {
            0 => break,
            n => done += n,
        }
    }
    Ok(done)
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

/// Recognises a kernel file by its content.
pub fn detect_format(file: &mut File, path: &Path) -> Result<KernelFormat, BootError> {
    let mut head = [0u8; 4];
    let n = read_at(file, 0, &mut head).map_err(io_err("kernel", path))?;
    if n == 4 && head == *b"\x7fELF" {
        return Ok(KernelFormat::Elf);
    }
    let mut sig = [0u8; 4];
    let n = read_at(file, 0x202, &mut sig).map_err(io_err("kernel", path))?;
    if n == 4 && sig == *b"HdrS" {
        return Ok(KernelFormat::BzImage);
    }
    Err(BootError::UnknownKernelFormat(path.to_path_buf()))
}

/// Checks an ELF kernel against its file size and guest RAM before loading:
/// linux-loader's own errors cannot tell a truncated file from a kernel that
/// does not fit.
fn check_elf(file: &mut File, path: &Path, file_len: u64, mem_size: u64) -> Result<(), BootError> {
    let bad = |why: &str| BootError::BadElf {
        path: path.to_path_buf(),
        why: why.to_string(),
    };
    let truncated = |needed: u64| BootError::TruncatedKernel {
        path: path.to_path_buf(),
        needed,
        actual: file_len,
    };
    let mut eh = [0u8; 64];
    let n = read_at(file, 0, &mut eh).map_err(io_err("kernel", path))?;
    if n < 64 {
        return Err(truncated(64));
    }
    if eh[4] != 2 {
        return Err(bad("not ELFCLASS64"));
    }
    if eh[5] != 1 {
        return Err(bad("not little-endian"));
    }
    if u16_at(&eh, 18) != 62 {
        return Err(bad("machine is not x86-64"));
    }
    let phoff = u64_at(&eh, 32);
    let phentsize = u16_at(&eh, 54);
    let phnum = u16_at(&eh, 56);
    if phentsize != 56 {
        return Err(bad("program header size is not 56"));
    }
    if phnum == 0 {
        return Err(bad("no program headers"));
    }
    let ph_end = phoff
        .checked_add(u64::from(phnum) * 56)
        .ok_or_else(|| bad("program header offset overflows"))?;
    if ph_end > file_len {
        return Err(truncated(ph_end));
    }
    let mut ph = vec![0u8; usize::from(phnum) * 56];
    read_at(file, phoff, &mut ph).map_err(io_err("kernel", path))?;
    let mut needed = 0u64;
    let mut end = 0u64;
    for p in ph.chunks_exact(56) {
        let p_type = u32_at(p, 0);
        let offset = u64_at(p, 8);
        let paddr = u64_at(p, 24);
        let filesz = u64_at(p, 32);
        let memsz = u64_at(p, 40);
        if p_type == 1 || p_type == 4 {
            // PT_LOAD and PT_NOTE are read from the file.
            let seg_end = offset
                .checked_add(filesz)
                .ok_or_else(|| bad("segment overflows"))?;
            needed = needed.max(seg_end);
        }
        if p_type == 1 && filesz > 0 {
            let seg_end = paddr
                .checked_add(memsz.max(filesz))
                .ok_or_else(|| bad("segment address overflows"))?;
            if paddr < HIMEM_START {
                return Err(bad("a segment loads below 1 MiB"));
            }
            end = end.max(seg_end);
        }
    }
    if needed > file_len {
        return Err(truncated(needed));
    }
    if end > mem_size {
        return Err(BootError::KernelTooBig {
            path: path.to_path_buf(),
            end,
            mem_size,
        });
    }
    Ok(())
}

/// Checks a bzImage's header against its file size and guest RAM.
fn check_bzimage(
    file: &mut File,
    path: &Path,
    file_len: u64,
    mem_size: u64,
) -> Result<(), BootError> {
    let mut hdr = [0u8; 0x270];
    let n = read_at(file, 0, &mut hdr).map_err(io_err("kernel", path))?;
    if n < hdr.len() {
        return Err(BootError::TruncatedKernel {
            path: path.to_path_buf(),
            needed: hdr.len() as u64,
            actual: file_len,
        });
    }
    let setup_sects = match hdr[0x1f1] {
        0 => 4u64,
        s => u64::from(s),
    };
    let syssize = u64::from(u32_at(&hdr, 0x1f4)); // in 16-byte paragraphs
    let version = u16_at(&hdr, 0x206);
    let loadflags = hdr[0x211];
    if version < 0x0206 || loadflags & 1 == 0 {
        return Err(BootError::BadElf {
            path: path.to_path_buf(),
            why: format!("bzImage boot protocol {version:#x} is too old or not loaded high"),
        });
    }
    let needed = (setup_sects + 1) * 512 + syssize * 16;
    if needed > file_len {
        return Err(BootError::TruncatedKernel {
            path: path.to_path_buf(),
            needed,
            actual: file_len,
        });
    }
    let init_size = u64::from(u32_at(&hdr, 0x260));
    let pref_address = u64_at(&hdr, 0x258);
    let end = bzimage_end(HIMEM_START, file_len, pref_address, init_size);
    if end > mem_size {
        return Err(BootError::KernelTooBig {
            path: path.to_path_buf(),
            end,
            mem_size,
        });
    }
    Ok(())
}

/// Where a bzImage's memory use ends: the loaded image, and `init_size`
/// bytes from wherever the kernel decompresses: in place, or at its preferred
/// address (`pref_address`, where a relocatable kernel moves itself when
/// loaded lower). The initrd must stay above this.
fn bzimage_end(load: u64, image_len: u64, pref_address: u64, init_size: u64) -> u64 {
    let image_end = load.saturating_add(image_len);
    let in_place = load.saturating_add(init_size);
    let at_pref = pref_address.saturating_add(init_size);
    image_end.max(in_place).max(at_pref)
}

/// What loading left in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedKernel {
    /// Format of the file.
    pub format: KernelFormat,
    /// Entry state.
    pub entry: BootEntry,
    /// End of the kernel image in guest memory (page aligned up).
    pub kernel_end: u64,
    /// Where the initrd went.
    pub initrd: Option<InitrdPlacement>,
}

fn page_align_up(x: u64) -> u64 {
    x.saturating_add(0xfff) & !0xfff
}

/// Places the initrd at the top of RAM (below `max_addr`), page aligned,
/// above `kernel_end`.
pub fn place_initrd(size: u64, kernel_end: u64, mem_size: u64, max_addr: u64) -> Option<u64> {
    let top = mem_size.min(max_addr);
    let addr = top.checked_sub(size)? & !0xfff;
    (addr >= page_align_up(kernel_end)).then_some(addr)
}

fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    mem_size: u64,
    max_addr: u64,
) -> Result<InitrdPlacement, BootError> {
    let mut f = File::open(path).map_err(io_err("initrd", path))?;
    let size = f.metadata().map_err(io_err("initrd", path))?.len();
    let addr = place_initrd(size, kernel_end, mem_size, max_addr).ok_or_else(|| {
        BootError::InitrdTooBig {
            path: path.to_path_buf(),
            size,
            room: mem_size
                .min(max_addr)
                .saturating_sub(page_align_up(kernel_end)),
            kernel_end,
        }
    })?;
    let len = usize::try_from(size).map_err(|_| BootError::Memory("initrd too large".into()))?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, len)
        .map_err(|e| BootError::Io {
            what: "initrd",
            path: path.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?;
    Ok(InitrdPlacement { addr, size })
}

fn write_cmdline(mem: &GuestMemoryMmap, line: &str) -> Result<(), BootError> {
    let mut bytes = line.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(|e| BootError::Memory(e.to_string()))
}

fn write_gdt(mem: &GuestMemoryMmap, gdt: &[u64]) -> Result<(), BootError> {
    let bytes: Vec<u8> = gdt.iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(BOOT_GDT_ADDR))
        .map_err(|e| BootError::Memory(e.to_string()))
}

/// Writes the GDT (and for long mode the page tables) a mode needs.
pub fn write_mode_tables(mem: &GuestMemoryMmap, mode: CpuMode) -> Result<(), BootError> {
    match mode {
        CpuMode::Real => Ok(()),
        CpuMode::Protected32 => write_gdt(mem, &gdt::GDT_32),
        CpuMode::Long64 => {
            write_gdt(mem, &gdt::GDT_64)?;
            paging::write_identity_tables(mem).map_err(|e| BootError::Memory(e.to_string()))?;
            Ok(())
        }
    }
}

/// Checks a kernel and initrd before anything else is created: both files
/// open, the kernel is an ELF or a bzImage whose headers match its size and
/// whose image fits in `mem_size`. Cheap (headers only); needs no KVM.
pub fn validate_kernel(
    kernel: &Path,
    initrd: Option<&Path>,
    mem_size: u64,
) -> Result<KernelFormat, BootError> {
    let mut file = File::open(kernel).map_err(io_err("kernel", kernel))?;
    let file_len = file.metadata().map_err(io_err("kernel", kernel))?.len();
    let format = detect_format(&mut file, kernel)?;
    match format {
        KernelFormat::Elf => check_elf(&mut file, kernel, file_len, mem_size)?,
        KernelFormat::BzImage => check_bzimage(&mut file, kernel, file_len, mem_size)?,
    }
    if let Some(p) = initrd {
        File::open(p).map_err(io_err("initrd", p))?;
    }
    Ok(format)
}

/// Loads a kernel, its initrd and command line into guest memory and writes
/// the boot parameters for its protocol. `cmdline` is the rendered line.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<LoadedKernel, BootError> {
    let mut file = File::open(kernel).map_err(io_err("kernel", kernel))?;
    let file_len = file.metadata().map_err(io_err("kernel", kernel))?.len();
    let format = detect_format(&mut file, kernel)?;
    let loader_err = |source| BootError::Loader {
        path: kernel.to_path_buf(),
        source,
    };
    let (entry, kernel_end, setup_header, initrd_max) = match format {
        KernelFormat::Elf => {
            check_elf(&mut file, kernel, file_len, mem_size)?;
            let r = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(loader_err)?;
            let entry = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => BootEntry {
                    protocol: BootProtocol::Pvh,
                    mode: CpuMode::Protected32,
                    rip: addr.0,
                    rsi: 0,
                    rbx: PVH_INFO_ADDR,
                    rsp: 0,
                },
                _ => BootEntry {
                    protocol: BootProtocol::Linux64,
                    mode: CpuMode::Long64,
                    rip: r.kernel_load.0,
                    rsi: ZERO_PAGE_ADDR,
                    rbx: 0,
                    rsp: BOOT_STACK_POINTER,
                },
            };
            (entry, r.kernel_end, None, u64::from(u32::MAX))
        }
        KernelFormat::BzImage => {
            check_bzimage(&mut file, kernel, file_len, mem_size)?;
            let r = BzImage::load(
                mem,
                Some(GuestAddress(HIMEM_START)),
                &mut file,
                Some(GuestAddress(HIMEM_START)),
            )
            .map_err(loader_err)?;
            let hdr = r
                .setup_header
                .ok_or_else(|| BootError::UnknownKernelFormat(kernel.to_path_buf()))?;
            let init_size = u64::from(hdr.init_size);
            let initrd_max = u64::from(hdr.initrd_addr_max).saturating_add(1);
            let entry = BootEntry {
                protocol: BootProtocol::Linux64,
                mode: CpuMode::Long64,
                // The 64-bit entry is 0x200 past the protected-mode kernel start.
                rip: r.kernel_load.0 + 0x200,
                rsi: ZERO_PAGE_ADDR,
                rbx: 0,
                rsp: BOOT_STACK_POINTER,
            };
            let end = bzimage_end(
                r.kernel_load.0,
                r.kernel_end.saturating_sub(r.kernel_load.0),
                hdr.pref_address,
                init_size,
            );
            (entry, end, Some(hdr), initrd_max)
        }
    };
    let kernel_end = page_align_up(kernel_end);
    let initrd = match initrd {
        Some(p) => Some(load_initrd(mem, p, kernel_end, mem_size, initrd_max)?),
        None => None,
    };
    write_cmdline(mem, cmdline)?;
    write_mode_tables(mem, entry.mode)?;
    match entry.protocol {
        BootProtocol::Pvh => params::write_pvh(mem, mem_size, initrd)
            .map_err(|e| BootError::Params(e.to_string()))?,
        _ => {
            let bp = params::linux_boot_params(setup_header, mem_size, cmdline.len() + 1, initrd);
            params::write_linux(mem, &bp).map_err(|e| BootError::Params(e.to_string()))?;
        }
    }
    tracing::info!(
        ?format,
        protocol = entry.protocol.name(),
        entry = format_args!("{:#x}", entry.rip),
        kernel_end = format_args!("{:#x}", kernel_end),
        initrd = ?initrd,
        "kernel loaded"
    );
    Ok(LoadedKernel {
        format,
        entry,
        kernel_end,
        initrd,
    })
}

/// Copies raw code into guest memory and describes its entry.
pub fn load_raw_code(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    code: &[u8],
    load_addr: u64,
    entry: u64,
    mode: CpuMode,
) -> Result<BootEntry, BootError> {
    let too_big = || BootError::RawCodeTooBig {
        addr: load_addr,
        len: code.len(),
    };
    let end = load_addr
        .checked_add(code.len() as u64)
        .ok_or_else(too_big)?;
    if end > mem_size {
        return Err(too_big());
    }
    mem.write_slice(code, GuestAddress(load_addr))
        .map_err(|_| too_big())?;
    write_mode_tables(mem, mode)?;
    Ok(BootEntry {
        protocol: BootProtocol::RawCode,
        mode,
        rip: entry,
        rsi: 0,
        rbx: 0,
        rsp: if mode == CpuMode::Long64 {
            BOOT_STACK_POINTER
        } else {
            0
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn mem(mib: u64) -> GuestMemoryMmap {
        crate::layout::create_guest_memory(mib).unwrap()
    }

    fn file_with(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f.flush().unwrap();
        f
    }

    /// A minimal x86-64 ELF with one PT_LOAD of `code` at `paddr`.
    fn tiny_elf(paddr: u64, code: &[u8], memsz: u64) -> Vec<u8> {
        osso_testkit::elf::exec(paddr, code, memsz, &[])
    }

    #[test]
    fn validation_needs_no_guest_memory() {
        let k = file_with(&tiny_elf(0x20_0000, &[0x90; 16], 16));
        assert_eq!(
            validate_kernel(k.path(), None, 16 << 20).unwrap(),
            KernelFormat::Elf
        );
        assert!(matches!(
            validate_kernel(k.path(), Some(Path::new("/nope")), 16 << 20),
            Err(BootError::Io { what: "initrd", .. })
        ));
        assert!(matches!(
            validate_kernel(k.path(), None, 1 << 20),
            Err(BootError::KernelTooBig { .. })
        ));
        let g = file_with(b"garbage");
        assert!(matches!(
            validate_kernel(g.path(), None, 16 << 20),
            Err(BootError::UnknownKernelFormat(_))
        ));
    }

    #[test]
    fn missing_file_is_named() {
        let m = mem(16);
        let err =
            load_kernel(&m, 16 << 20, Path::new("/nonexistent/vmlinux"), None, "").unwrap_err();
        assert!(matches!(err, BootError::Io { what: "kernel", .. }));
        assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");
    }

    #[test]
    fn garbage_is_refused() {
        let m = mem(16);
        for content in [&b""[..], b"hello", &[0xabu8; 4096][..]] {
            let f = file_with(content);
            let err = load_kernel(&m, 16 << 20, f.path(), None, "").unwrap_err();
            assert!(matches!(err, BootError::UnknownKernelFormat(_)), "{err}");
            assert!(err
                .to_string()
                .contains("neither an ELF vmlinux nor a bzImage"));
        }
    }

    #[test]
    fn elf_without_pvh_loads_for_64bit_entry() {
        let m = mem(16);
        let code = [0xf4u8; 32];
        let f = file_with(&tiny_elf(0x20_0000, &code, 0x1000));
        let k = load_kernel(&m, 16 << 20, f.path(), None, "console=ttyS0").unwrap();
        assert_eq!(k.format, KernelFormat::Elf);
        assert_eq!(k.entry.protocol, BootProtocol::Linux64);
        assert_eq!((k.entry.rip, k.entry.rsi), (0x20_0000, ZERO_PAGE_ADDR));
        assert_eq!(k.kernel_end, 0x20_1000);
        let mut back = [0u8; 32];
        m.read_slice(&mut back, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(back, code);
        let mut line = [0u8; 14];
        m.read_slice(&mut line, GuestAddress(CMDLINE_ADDR)).unwrap();
        assert_eq!(&line, b"console=ttyS0\0");
    }

    #[test]
    fn truncated_elf_is_refused() {
        let m = mem(16);
        let full = tiny_elf(0x20_0000, &[0x90; 4096], 4096);
        for cut in [10usize, 64, 100, full.len() - 1] {
            let f = file_with(&full[..cut]);
            let err = load_kernel(&m, 16 << 20, f.path(), None, "").unwrap_err();
            assert!(
                matches!(err, BootError::TruncatedKernel { .. }),
                "cut {cut}: {err}"
            );
            assert!(err.to_string().contains("truncated"));
        }
    }

    #[test]
    fn elf_too_big_for_memory() {
        let m = mem(8);
        let f = file_with(&tiny_elf(0x100_0000, &[0x90; 16], 16));
        let err = load_kernel(&m, 8 << 20, f.path(), None, "").unwrap_err();
        assert!(matches!(err, BootError::KernelTooBig { .. }), "{err}");
    }

    #[test]
    fn wrong_arch_elf() {
        let m = mem(16);
        let mut e = tiny_elf(0x20_0000, &[0x90; 16], 16);
        e[18] = 40; // ARM
        let f = file_with(&e);
        let err = load_kernel(&m, 16 << 20, f.path(), None, "").unwrap_err();
        assert!(err.to_string().contains("not x86-64"), "{err}");
    }

    fn tiny_bzimage(payload: usize, declared: usize) -> Vec<u8> {
        let setup_sects = 1u8;
        let mut b = vec![0u8; (setup_sects as usize + 1) * 512];
        b[0x1f1] = setup_sects;
        b[0x1f4..0x1f8].copy_from_slice(&((declared / 16) as u32).to_le_bytes());
        b[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        b[0x202..0x206].copy_from_slice(b"HdrS");
        b[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        b[0x211] = 1; // LOADED_HIGH
        b[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        b[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes()); // initrd_addr_max
        b[0x260..0x264].copy_from_slice(&0x20_0000u32.to_le_bytes()); // init_size
        b.extend_from_slice(&vec![0xf4u8; payload]);
        b
    }

    #[test]
    fn bzimage_loads_with_initrd_on_top() {
        let m = mem(16);
        let f = file_with(&tiny_bzimage(4096, 4096));
        let initrd = file_with(&[7u8; 5000]);
        let k = load_kernel(&m, 16 << 20, f.path(), Some(initrd.path()), "a=b").unwrap();
        assert_eq!(k.format, KernelFormat::BzImage);
        assert_eq!(
            (k.entry.protocol, k.entry.mode),
            (BootProtocol::Linux64, CpuMode::Long64)
        );
        assert_eq!(k.entry.rip, 0x10_0200);
        let i = k.initrd.unwrap();
        assert_eq!(i.size, 5000);
        assert_eq!(i.addr % 4096, 0);
        assert!(i.addr + i.size <= 16 << 20 && i.addr + i.size > (16 << 20) - 8192);
        let bp: linux_loader::bootparam::boot_params =
            m.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        assert_eq!({ bp.hdr.ramdisk_image } as u64, i.addr);
        assert_eq!({ bp.hdr.ramdisk_size }, 5000);
        assert_eq!({ bp.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!(bp.e820_entries, 3);
    }

    #[test]
    fn truncated_bzimage_is_refused() {
        let m = mem(16);
        let f = file_with(&tiny_bzimage(1000, 4096));
        let err = load_kernel(&m, 16 << 20, f.path(), None, "").unwrap_err();
        assert!(matches!(err, BootError::TruncatedKernel { .. }), "{err}");
    }

    #[test]
    fn initrd_that_does_not_fit() {
        let m = mem(8);
        let f = file_with(&tiny_elf(0x20_0000, &[0x90; 16], 16));
        let initrd = file_with(&vec![1u8; 7 << 20]);
        let err = load_kernel(&m, 8 << 20, f.path(), Some(initrd.path()), "").unwrap_err();
        assert!(matches!(err, BootError::InitrdTooBig { .. }), "{err}");
        assert!(err.to_string().contains("does not fit"));
        let missing =
            load_kernel(&m, 8 << 20, f.path(), Some(Path::new("/nope/initrd")), "").unwrap_err();
        assert!(matches!(missing, BootError::Io { what: "initrd", .. }));
    }

    #[test]
    fn bzimage_end_covers_decompression_at_the_preferred_address() {
        assert_eq!(bzimage_end(0x10_0000, 0x1000, 0, 0x20_0000), 0x30_0000);
        assert_eq!(
            bzimage_end(0x10_0000, 0x1000, 0x100_0000, 0xe0_0000),
            0x1e0_0000
        );
        assert_eq!(bzimage_end(0x10_0000, 0x50_0000, 0, 0x1000), 0x60_0000);
    }

    #[test]
    fn initrd_placement() {
        assert_eq!(
            place_initrd(0x1000, 0x20_0000, 0x80_0000, u64::MAX),
            Some(0x7f_f000)
        );
        assert_eq!(
            place_initrd(0x1001, 0x20_0000, 0x80_0000, u64::MAX),
            Some(0x7f_e000)
        );
        assert_eq!(
            place_initrd(0x60_0000, 0x20_0000, 0x80_0000, u64::MAX),
            Some(0x20_0000)
        );
        assert_eq!(
            place_initrd(0x60_0001, 0x20_0000, 0x80_0000, u64::MAX),
            None
        );
        assert_eq!(
            place_initrd(0x1000, 0x20_0000, 0x80_0000, 0x40_0000),
            Some(0x3f_f000)
        );
        assert_eq!(place_initrd(u64::MAX, 0, 0x80_0000, u64::MAX), None);
    }

    #[test]
    fn raw_code_bounds() {
        let m = mem(8);
        let e = load_raw_code(&m, 8 << 20, &[0xf4], 0x1000, 0x1000, CpuMode::Real).unwrap();
        assert_eq!((e.protocol, e.rip), (BootProtocol::RawCode, 0x1000));
        assert!(load_raw_code(&m, 8 << 20, &[0xf4; 16], (8 << 20) - 8, 0, CpuMode::Real).is_err());
        assert!(load_raw_code(&m, 8 << 20, &[0xf4; 16], u64::MAX - 4, 0, CpuMode::Real).is_err());
    }
}

//! [`Config`]: everything about a VM a caller can choose, with a builder and
//! sensible defaults (the default Osso image, 128 MiB, 1 vCPU, the user-mode
//! network with no egress, console captured, ready when `/init` signals it),
//! and the one place it becomes the VMM's configuration: a `VmConfig` for a
//! boot, `RestoreOptions` for a restore, a `NetConfig` for the network. The
//! checks are the VMM's own rules, run before anything starts.

use std::path::PathBuf;
use std::time::Duration;

use osso_vmm::net::{MacAddr, NetBackendConfig, NetConfig};

use crate::error::Error;

/// Which kernel and initramfs to boot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Image {
    /// The default Osso image: the prebuilt image directory named by
    /// [`crate::IMAGE_DIR_ENV`] (`OSSO_IMAGE_DIR`) when it is set, else the
    /// one `osso-guest` built from its sources (built by `osso-guest build`
    /// or [`crate::build_image`], never by `spawn`).
    #[default]
    Default,
    /// A prebuilt Osso image directory (what `osso-guest build` prints, or a
    /// copy of it): its `manifest.json` is read and the files it names
    /// checked (size and sha256) once per process; no sources needed. Takes
    /// precedence over `OSSO_IMAGE_DIR`.
    Dir(PathBuf),
    /// Your own kernel (ELF vmlinux or bzImage) and initramfs.
    Custom {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
    },
}

/// Which form of the default image's kernel to boot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum KernelFormat {
    /// The uncompressed ELF vmlinux through its PVH entry (the fast path).
    #[default]
    Pvh,
    /// The compressed bzImage through the Linux boot protocol.
    BzImage,
}

/// When [`crate::spawn`] considers the guest ready and returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ReadyWhen {
    /// The guest's init wrote the boot timer (Osso's `/init` does, when ready).
    #[default]
    BootTimer,
    /// A console line containing this text appeared.
    ConsoleLine(String),
    /// The guest answers a ping from the host through the user-mode network
    /// (works with no guest user space: the kernel answers with `ip=` set).
    GuestPing,
    /// As soon as the vCPUs run.
    Started,
}

impl std::fmt::Display for ReadyWhen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadyWhen::BootTimer => write!(f, "waiting for the boot timer"),
            ReadyWhen::ConsoleLine(s) => write!(f, "waiting for console line {s:?}"),
            ReadyWhen::GuestPing => write!(f, "waiting for the guest to answer ping"),
            ReadyWhen::Started => write!(f, "waiting for the vCPUs to start"),
        }
    }
}

/// The guest's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Network {
    /// No network device.
    None,
    /// The user-mode network inside the VMM (no privileges): the guest is
    /// 10.0.2.15/24, the VMM is its gateway 10.0.2.2. No egress: the guest
    /// reaches only the host loopback ports listed in `allowed_host_ports`.
    User {
        /// Host loopback port -> guest port.
        forwards: Vec<(u16, u16)>,
        allowed_host_ports: Vec<u16>,
    },
    /// An existing or new TAP device (root or CAP_NET_ADMIN).
    Tap(String),
}

impl Default for Network {
    fn default() -> Self {
        Network::User {
            forwards: Vec::new(),
            allowed_host_ports: Vec::new(),
        }
    }
}

/// A VM's configuration. Build one with [`Config::builder`].
#[derive(Debug, Clone)]
pub struct Config {
    pub image: Image,
    pub kernel_format: KernelFormat,
    pub mem_mib: u64,
    pub vcpus: u8,
    /// Added to the kernel command line, after the VMM's own.
    pub cmdline_extra: Vec<String>,
    /// Print the kernel's log on the console (default off: the kernel boots
    /// `quiet`, so only its errors and panics reach the console, and no byte
    /// of a boot log costs a VM exit). The boot phases do not need it:
    /// `/init` marks them through the boot-timer device.
    pub kernel_log: bool,
    pub network: Network,
    /// Echo console lines to this process's stdout as they arrive.
    pub echo_console: bool,
    /// The most console bytes kept for [`crate::Vm::console`] (older lines are dropped).
    pub console_limit: usize,
    pub ready: ReadyWhen,
    /// How long [`crate::spawn`] waits for ready before stopping the VM.
    pub boot_timeout: Duration,
    /// The VM is stopped after this long in all (None: runs until it ends or is stopped).
    pub lifetime: Option<Duration>,
    /// Confine the VM's vCPU and device threads with seccomp allowlists
    /// (default on; turn off only for debugging).
    pub seccomp: bool,
    /// Dropping the VM stops and joins its threads, then leaves closing the
    /// KVM VM and unmapping its RAM to a background thread
    /// ([`crate::reaper`]): a faster drop for a request path, with the VM's
    /// last file descriptors and memory released a little later (see
    /// [`crate::wait_for_background_teardown`]). Default off.
    pub background_teardown: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            image: Image::Default,
            kernel_format: KernelFormat::Pvh,
            mem_mib: 128,
            vcpus: 1,
            cmdline_extra: Vec::new(),
            kernel_log: false,
            network: Network::default(),
            echo_console: false,
            console_limit: 1 << 20,
            ready: ReadyWhen::BootTimer,
            boot_timeout: Duration::from_secs(30),
            lifetime: None,
            seccomp: true,
            background_teardown: false,
        }
    }
}

impl Config {
    /// A builder starting from the defaults.
    pub fn builder() -> ConfigBuilder {
        ConfigBuilder(Config::default())
    }

    /// Checks what can be checked before anything starts.
    pub fn validate(&self) -> Result<(), Error> {
        // The VMM's rule, run early: before the image is looked for.
        osso_vmm::VmConfig::validate_size(self.mem_mib, self.vcpus)
            .map_err(|e| Error::Config(e.to_string()))?;
        if let Image::Custom { kernel, initrd } = &self.image {
            for p in std::iter::once(kernel).chain(initrd) {
                if !p.is_file() {
                    return Err(Error::Config(format!("{}: no such file", p.display())));
                }
            }
        }
        self.validate_host_side()
    }

    /// The checks that apply to a restore too (which takes RAM, vCPUs and
    /// kernel from the snapshot): network, readiness, timeouts.
    pub(crate) fn validate_host_side(&self) -> Result<(), Error> {
        if self.boot_timeout.is_zero() {
            return Err(Error::Config("boot timeout is zero".into()));
        }
        if let Network::User { forwards, .. } = &self.network {
            if let Some((h, g)) = forwards.iter().find(|(_, g)| *g == 0) {
                return Err(Error::Config(format!("forward {h}:{g}: guest port 0")));
            }
        }
        if let Network::Tap(name) = &self.network {
            // The VMM's own rule, so that a name passes here only if the
            // VMM will take it.
            osso_vmm::net::tap::validate_name(name)
                .map_err(|e| Error::Config(format!("TAP name: {e}")))?;
        }
        if self.ready == ReadyWhen::GuestPing && !matches!(self.network, Network::User { .. }) {
            return Err(Error::Config(
                "ready when the guest answers ping needs the user network".into(),
            ));
        }
        Ok(())
    }

    /// The VMM's configuration for booting `kernel` and `initrd`: console
    /// lines to `lines`, the boot clock from `start`.
    pub(crate) fn vm_config(
        &self,
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        lines: osso_vmm::ConsoleLines,
        start: std::time::Instant,
    ) -> osso_vmm::VmConfig {
        let mut vmc = osso_vmm::VmConfig::new(osso_vmm::BootSource::Kernel { kernel, initrd });
        vmc.mem_mib = self.mem_mib;
        vmc.vcpus = self.vcpus;
        vmc.cmdline_extra = self.cmdline_tail();
        vmc.timeout = self.lifetime;
        vmc.console_lines = Some(lines);
        vmc.start = Some(start);
        vmc.seccomp = self.seccomp;
        vmc
    }

    /// What the SDK adds to the VMM's command line: `quiet` unless the
    /// kernel's log is wanted, then the caller's additions (last, so that
    /// they can override it, say with `loglevel=`).
    fn cmdline_tail(&self) -> Option<String> {
        let quiet = (!self.kernel_log).then_some("quiet");
        let parts: Vec<&str> = quiet
            .into_iter()
            .chain(self.cmdline_extra.iter().map(String::as_str))
            .collect();
        (!parts.is_empty()).then(|| parts.join(" "))
    }

    /// The VMM's options for a restore (the host side only: RAM, vCPUs and
    /// kernel come from the snapshot).
    pub(crate) fn restore_options(
        &self,
        lines: osso_vmm::ConsoleLines,
        start: std::time::Instant,
    ) -> osso_vmm::snapshot::RestoreOptions {
        osso_vmm::snapshot::RestoreOptions {
            console: Box::new(std::io::sink()),
            console_lines: Some(lines),
            console_input: None,
            timeout: self.lifetime,
            start: Some(start),
            seccomp: self.seccomp,
            net: Some(self.net_config()),
        }
    }

    /// The VMM's network configuration (a fresh locally administered MAC per VM).
    pub(crate) fn net_config(&self) -> NetConfig {
        let mut c = NetConfig {
            mac: MacAddr::random_local(),
            ..NetConfig::default()
        };
        match &self.network {
            Network::None => c.backend = NetBackendConfig::None,
            Network::Tap(name) => c.backend = NetBackendConfig::Tap(name.clone()),
            // Forwards are set up on the running network (see `Vm`), so that
            // a host port of 0 can be bound to any free port and reported.
            Network::User {
                allowed_host_ports, ..
            } => {
                c.backend = NetBackendConfig::User;
                c.allowed_host_ports = allowed_host_ports.clone();
            }
        }
        c
    }
}

/// Builds a [`Config`].
#[derive(Debug, Clone)]
pub struct ConfigBuilder(Config);

impl ConfigBuilder {
    /// Guest RAM in MiB (default 128).
    pub fn mem_mib(mut self, mib: u64) -> Self {
        self.0.mem_mib = mib;
        self
    }
    /// vCPUs (default 1).
    pub fn vcpus(mut self, n: u8) -> Self {
        self.0.vcpus = n;
        self
    }
    /// Boot the prebuilt Osso image in `dir` (see [`Image::Dir`]): what
    /// `osso-guest build` printed, or a copy of that directory. Takes
    /// precedence over `OSSO_IMAGE_DIR` ([`crate::IMAGE_DIR_ENV`]), which
    /// takes precedence over finding or building the image from sources.
    pub fn image_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.0.image = Image::Dir(dir.into());
        self
    }
    /// Boot your own kernel and initramfs instead of the default image.
    pub fn custom_image(mut self, kernel: impl Into<PathBuf>, initrd: Option<PathBuf>) -> Self {
        self.0.image = Image::Custom {
            kernel: kernel.into(),
            initrd,
        };
        self
    }
    /// Boot the default image's bzImage (Linux boot protocol) instead of its vmlinux (PVH).
    pub fn kernel_format(mut self, f: KernelFormat) -> Self {
        self.0.kernel_format = f;
        self
    }
    /// Append to the kernel command line.
    pub fn cmdline(mut self, extra: impl Into<String>) -> Self {
        self.0.cmdline_extra.push(extra.into());
        self
    }
    /// Print the kernel's whole log on the console (default off: a quiet
    /// kernel, whose errors and panics still reach the console).
    pub fn kernel_log(mut self, on: bool) -> Self {
        self.0.kernel_log = on;
        self
    }
    /// No network device.
    pub fn no_network(mut self) -> Self {
        self.0.network = Network::None;
        self
    }
    /// A TAP device (root or CAP_NET_ADMIN).
    pub fn tap(mut self, name: impl Into<String>) -> Self {
        self.0.network = Network::Tap(name.into());
        self
    }
    /// The user-mode network (the default), keeping forwards already set.
    pub fn user_network(mut self) -> Self {
        if !matches!(self.0.network, Network::User { .. }) {
            self.0.network = Network::default();
        }
        self
    }
    /// Forward host loopback `host_port` (0: any free port) to `guest_port` (user network).
    pub fn forward(mut self, host_port: u16, guest_port: u16) -> Self {
        self = self.user_network();
        if let Network::User { forwards, .. } = &mut self.0.network {
            forwards.push((host_port, guest_port));
        }
        self
    }
    /// Let the guest reach host loopback `port` at 10.0.2.2 (user network).
    pub fn allow_host_port(mut self, port: u16) -> Self {
        self = self.user_network();
        if let Network::User {
            allowed_host_ports, ..
        } = &mut self.0.network
        {
            allowed_host_ports.push(port);
        }
        self
    }
    /// Echo the console to stdout as it arrives.
    pub fn echo_console(mut self, on: bool) -> Self {
        self.0.echo_console = on;
        self
    }
    /// When spawn() returns.
    pub fn ready_when(mut self, r: ReadyWhen) -> Self {
        self.0.ready = r;
        self
    }
    /// How long spawn() waits for ready (default 30 s).
    pub fn boot_timeout(mut self, t: Duration) -> Self {
        self.0.boot_timeout = t;
        self
    }
    /// Stop the VM after this long in all.
    pub fn lifetime(mut self, t: Duration) -> Self {
        self.0.lifetime = Some(t);
        self
    }
    /// Seccomp filters on the VM's vCPU and device threads (default on).
    pub fn seccomp(mut self, on: bool) -> Self {
        self.0.seccomp = on;
        self
    }
    /// Leave the slow end of the VM's teardown to a background thread
    /// (default off; see [`Config::background_teardown`]).
    pub fn background_teardown(mut self, on: bool) -> Self {
        self.0.background_teardown = on;
        self
    }
    /// The finished configuration.
    pub fn build(self) -> Config {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = Config::default();
        assert_eq!(c.mem_mib, 128);
        assert_eq!(c.vcpus, 1);
        assert_eq!(c.image, Image::Default);
        assert_eq!(c.ready, ReadyWhen::BootTimer);
        assert!(
            matches!(&c.network, Network::User { forwards, allowed_host_ports } if forwards.is_empty() && allowed_host_ports.is_empty())
        );
        assert!(c.validate().is_ok());
        assert!(c.seccomp, "seccomp is on by default");
    }

    #[test]
    fn builder_sets_every_knob() {
        let c = Config::builder()
            .mem_mib(256)
            .vcpus(2)
            .cmdline("quiet")
            .forward(0, 80)
            .allow_host_port(5432)
            .ready_when(ReadyWhen::ConsoleLine("hi".into()))
            .boot_timeout(Duration::from_secs(5))
            .lifetime(Duration::from_secs(9))
            .build();
        assert_eq!((c.mem_mib, c.vcpus), (256, 2));
        assert_eq!(c.cmdline_extra, ["quiet"]);
        assert_eq!(c.cmdline_tail().as_deref(), Some("quiet quiet"));
        let logged = Config::builder().kernel_log(true).build();
        assert_eq!(
            logged.cmdline_tail(),
            None,
            "the kernel's log, nothing added"
        );
        let stay = Config::builder().cmdline("osso.stay").build();
        assert_eq!(
            stay.cmdline_tail().as_deref(),
            Some("quiet osso.stay"),
            "quiet by default, the caller's words last"
        );
        assert_eq!(
            c.network,
            Network::User {
                forwards: vec![(0, 80)],
                allowed_host_ports: vec![5432]
            }
        );
        let n = c.net_config();
        assert_eq!(n.backend, NetBackendConfig::User);
        assert_eq!(n.allowed_host_ports, [5432]);
        assert_ne!(n.mac, c.net_config().mac, "a fresh MAC per VM");
        assert_eq!(c.lifetime, Some(Duration::from_secs(9)));
        let c = Config::builder().image_dir("/srv/osso-image").build();
        assert_eq!(c.image, Image::Dir("/srv/osso-image".into()));
    }

    #[test]
    fn a_tap_name_passes_only_if_the_vmm_takes_it() {
        for name in ["osso0", "tap_15_chars_ok"] {
            assert!(
                Config::builder().tap(name).build().validate().is_ok(),
                "{name}"
            );
            assert!(osso_vmm::net::tap::validate_name(name).is_ok());
        }
        // Names the SDK's old rule let through and the VMM refused.
        for name in [
            "a:b",
            "..",
            "t\u{e4}p",
            "tab\tname",
            "",
            "0123456789abcdefg",
        ] {
            let e = Config::builder().tap(name).build().validate().unwrap_err();
            assert!(e.to_string().contains("TAP name"), "{name:?}: {e}");
            assert!(osso_vmm::net::tap::validate_name(name).is_err());
        }
    }
}

//! `osso-guest`: build the Osso guest image, or show the one that is built.
//!
//! ```text
//! osso-guest build [--kernel-source debian|download|PATH] [--toybox-source ...]
//! osso-guest info [--json] [--dir DIR]
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use osso_guest::{BuildOptions, ProgressMode, SourceSpec};

#[derive(Parser)]
#[command(
    name = "osso-guest",
    version,
    about = "Build and locate Osso Linux (kernel + Toybox initramfs)"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the image, or reuse the cached one when no input changed; print where it is.
    Build {
        #[command(flatten)]
        src: SourceArgs,
        /// Do not install missing Debian packages, even as root.
        #[arg(long)]
        no_install: bool,
        /// No progress bars.
        #[arg(long, short)]
        quiet: bool,
        /// Parallel make jobs (default: number of CPUs).
        #[arg(long, short)]
        jobs: Option<usize>,
    },
    /// Print the manifest of the image `build` would reuse; fails if none is built.
    /// With --dir, check and print the prebuilt image in DIR instead.
    Info {
        #[command(flatten)]
        src: SourceArgs,
        /// Print the manifest as JSON.
        #[arg(long)]
        json: bool,
        /// A prebuilt image directory (the one `build` prints, or a copy of
        /// it): its manifest.json is read and every file it names checked
        /// (size and sha256); the sources are not needed. What the SDK
        /// boots with `Config::image_dir` or `OSSO_IMAGE_DIR`.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(Args)]
struct SourceArgs {
    /// Kernel source: `debian` (linux-source-6.12), `download` (Linux 6.18.1,
    /// sha256-checked, falls back to debian), or a tarball or directory.
    #[arg(long, env = "OSSO_KERNEL_SOURCE", default_value = "debian")]
    kernel_source: SourceSpec,
    /// Toybox source: `debian` (0.8.9 orig tarball), `download` (0.8.13), or a tarball or directory.
    #[arg(long, env = "OSSO_TOYBOX_SOURCE", default_value = "debian")]
    toybox_source: SourceSpec,
}

impl SourceArgs {
    fn options(&self) -> BuildOptions {
        BuildOptions {
            kernel_source: self.kernel_source.clone(),
            toybox_source: self.toybox_source.clone(),
            ..BuildOptions::default()
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("osso-guest: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> osso_guest::Result<()> {
    match cli.command {
        Cmd::Build {
            src,
            no_install,
            quiet,
            jobs,
        } => {
            let mut opts = src.options();
            opts.install_missing = !no_install;
            if quiet {
                opts.progress = ProgressMode::Quiet;
            }
            if let Some(j) = jobs {
                opts.jobs = j;
            }
            let t = Instant::now();
            let image = osso_guest::build(&opts)?;
            let m = &image.manifest;
            println!(
                "{} image {} in {:.2}s: {}",
                if image.reused { "reused" } else { "built" },
                m.key,
                t.elapsed().as_secs_f64(),
                image.dir.display()
            );
            println!(
                "  kernel {} ({}), toybox {} ({})",
                m.kernel_version, m.kernel_source, m.toybox_version, m.toybox_source
            );
            println!(
                "  vmlinux   {:>10} B  {}",
                m.vmlinux_bytes,
                m.vmlinux_path.display()
            );
            println!(
                "  bzImage   {:>10} B  {}",
                m.bzimage_bytes,
                m.bzimage_path.display()
            );
            println!(
                "  initramfs {:>10} B  {} ({} B uncompressed)",
                m.initramfs_bytes,
                m.initramfs_path.display(),
                m.initramfs_uncompressed_bytes
            );
            Ok(())
        }
        Cmd::Info { src, json, dir } => {
            let image = match dir {
                Some(dir) => osso_guest::open_image_dir(dir)?,
                None => osso_guest::find(&src.options())?,
            };
            let m = &image.manifest;
            if json {
                println!("{}", m.to_json());
            } else {
                println!("image      {}", image.dir.display());
                println!("kernel     {} ({})", m.kernel_version, m.kernel_source);
                println!("toybox     {} ({})", m.toybox_version, m.toybox_source);
                println!(
                    "vmlinux    {} B (stripped; {} B unstripped)",
                    m.vmlinux_bytes, m.vmlinux_unstripped_bytes
                );
                println!("bzImage    {} B", m.bzimage_bytes);
                println!(
                    "initramfs  {} B ({} B uncompressed)",
                    m.initramfs_bytes, m.initramfs_uncompressed_bytes
                );
                println!("commands   {}", m.toybox_commands.join(" "));
            }
            Ok(())
        }
    }
}

//! The image manifest: what was built from what, with sizes and checksums.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Bumped when fields change meaning.
pub const MANIFEST_FORMAT: u32 = 1;

/// `manifest.json` of an image directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// The image's cache key (a hash of every input).
    pub key: String,
    pub kernel_version: String,
    pub kernel_source: String,
    pub toybox_version: String,
    pub toybox_source: String,
    pub toybox_commands: Vec<String>,
    pub vmlinux_path: PathBuf,
    /// Stripped ELF vmlinux (PVH entry).
    pub vmlinux_bytes: u64,
    pub vmlinux_sha256: String,
    pub vmlinux_unstripped_bytes: u64,
    pub bzimage_path: PathBuf,
    pub bzimage_bytes: u64,
    pub bzimage_sha256: String,
    pub initramfs_path: PathBuf,
    /// gzip-compressed cpio, as booted.
    pub initramfs_bytes: u64,
    pub initramfs_sha256: String,
    pub initramfs_uncompressed_bytes: u64,
    pub kernel_config_sha256: String,
    /// Wall time of the build that produced this image (0 when every step was cached).
    pub build_seconds: f64,
}

impl Manifest {
    /// Reads `manifest.json` from an image directory.
    pub fn read(dir: &Path) -> Result<Manifest> {
        let path = dir.join("manifest.json");
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| Error::Manifest {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if m.format != MANIFEST_FORMAT {
            return Err(Error::Manifest {
                path,
                reason: format!("format {} (this builder reads {MANIFEST_FORMAT})", m.format),
            });
        }
        Ok(m)
    }

    /// The JSON text of the manifest.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }
}

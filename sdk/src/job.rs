//! Per-request jobs: delivering a shell command to a fresh guest without
//! rebuilding the image, and reading its result back from the console.
//!
//! Linux unpacks every archive concatenated in the initramfs, so a job is a
//! second, tiny gzip cpio appended to the image's initramfs: `/osso/job` (the
//! script) and `/osso/nonce` (random per request). The image's `/init` runs the
//! job after the guest is ready and prints, on the console:
//!
//! ```text
//! OSSO-JOB <nonce> STDOUT
//! <stdout, base64, wrapped>
//! OSSO-JOB <nonce> STDERR
//! <stderr, base64, wrapped>
//! OSSO-JOB <nonce> EXIT <status>
//! ```
//!
//! The nonce is removed before the job runs, and the job's output is encoded,
//! so neither the job nor kernel messages can be taken for the framing.

use std::io::Read;

use base64::Engine;
use osso_guest::cpio::Archive;

/// The most console bytes [`crate::run`] keeps for a job's VM (at least;
/// a larger [`crate::Config::console_limit`] is kept as it is). The result
/// travels base64-encoded (4 bytes for 3, plus a newline every 76) after the
/// boot log, so this holds about 12 MiB of stdout and stderr together.
pub const JOB_CONSOLE_LIMIT: usize = 16 << 20;

/// Errors from preparing a job or reading its result.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JobError {
    #[error("building the job archive: {0}")]
    Archive(#[source] osso_guest::Error),
    #[error("reading the guest's initramfs {path}: {source}")]
    Initramfs {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no random source for the job nonce: {0}")]
    Random(#[source] std::io::Error),
    #[error("the guest printed no result for this job (no `OSSO-JOB <nonce> EXIT` line)")]
    NoResult,
    #[error("the job's result is malformed: {0}")]
    Malformed(String),
    /// The console dropped lines to stay within its limit, so the result
    /// is incomplete: the job's output was too large.
    #[error(
        "the job's output was too large: its base64 on the console passed the console limit \
         of {limit} bytes ({dropped_lines} lines dropped); raise Config::console_limit \
         or write less"
    )]
    OutputTooLarge { limit: usize, dropped_lines: u64 },
}

/// What a job produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The job's exit status, as the guest's shell reported it.
    pub status: i32,
}

impl JobOutput {
    /// stdout as text (lossy).
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    /// stderr as text (lossy).
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// A job ready to boot: the initramfs with the job appended, and its nonce.
#[derive(Debug, Clone)]
pub struct PreparedJob {
    pub initrd: Vec<u8>,
    pub nonce: String,
}

/// Appends a job running `script` (with `sh`) to the initramfs `base`.
pub fn prepare(base: &[u8], script: &str) -> Result<PreparedJob, JobError> {
    let nonce = new_nonce()?;
    let archive = job_archive(script, &nonce)?;
    let mut initrd = Vec::with_capacity(base.len() + archive.len() + 4);
    initrd.extend_from_slice(base);
    // The kernel finds the next archive at a 4-byte boundary, skipping zeros.
    initrd.resize(base.len().div_ceil(4) * 4, 0);
    initrd.extend_from_slice(&archive);
    Ok(PreparedJob { initrd, nonce })
}

/// Appends a job to the initramfs file at `path`.
pub fn prepare_from_file(path: &std::path::Path, script: &str) -> Result<PreparedJob, JobError> {
    let base = std::fs::read(path).map_err(|source| JobError::Initramfs {
        path: path.to_path_buf(),
        source,
    })?;
    prepare(&base, script)
}

/// The gzip cpio holding `/osso/job` and `/osso/nonce`.
fn job_archive(script: &str, nonce: &str) -> Result<Vec<u8>, JobError> {
    let err = JobError::Archive;
    let mut a = Archive::new(0);
    a.dir("osso", 0o755).map_err(|e| err(e.into()))?;
    a.file("osso/job", 0o755, script.as_bytes().to_vec())
        .map_err(|e| err(e.into()))?;
    a.file("osso/nonce", 0o600, nonce.as_bytes().to_vec())
        .map_err(|e| err(e.into()))?;
    let cpio = a.to_bytes().map_err(|e| err(e.into()))?;
    osso_guest::initramfs::gzip(&cpio).map_err(err)
}

/// 128 random bits, as hex.
fn new_nonce() -> Result<String, JobError> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(JobError::Random)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

impl PreparedJob {
    /// Reads the job's result from the guest's console text.
    pub fn parse(&self, console: &str) -> Result<JobOutput, JobError> {
        parse_output(console, &self.nonce)
    }
}

/// The guest's base64 line length (`base64 -w 76` in its `/init`).
const B64_LINE: usize = 76;

/// Reads the result framed by `nonce` out of console text.
pub fn parse_output(console: &str, nonce: &str) -> Result<JobOutput, JobError> {
    let marker = format!("OSSO-JOB {nonce} ");
    #[derive(PartialEq)]
    enum Section {
        None,
        Stdout,
        Stderr,
    }
    let mut section = Section::None;
    let (mut out, mut err) = (String::new(), String::new());
    let mut seen_stdout = false;
    // The length of the section's last base64 line: every line but the last
    // is full, so a short one followed by more means console text broke into
    // the output and part of it was lost.
    let mut last_len: Option<usize> = None;
    for raw in console.lines() {
        let line = raw.trim_end_matches('\r');
        if let Some(rest) = line.strip_prefix(&marker) {
            last_len = None;
            match rest.trim() {
                "STDOUT" => {
                    section = Section::Stdout;
                    seen_stdout = true;
                }
                "STDERR" => section = Section::Stderr,
                other => {
                    let status = other
                        .strip_prefix("EXIT ")
                        .ok_or_else(|| JobError::Malformed(format!("unknown marker {other:?}")))?
                        .trim()
                        .parse::<i32>()
                        .map_err(|e| JobError::Malformed(format!("exit status: {e}")))?;
                    if !seen_stdout {
                        return Err(JobError::Malformed("EXIT before STDOUT".into()));
                    }
                    let decode = |s: &str, what: &str| {
                        base64::engine::general_purpose::STANDARD
                            .decode(s)
                            .map_err(|e| JobError::Malformed(format!("{what}: {e}")))
                    };
                    return Ok(JobOutput {
                        stdout: decode(&out, "stdout")?,
                        stderr: decode(&err, "stderr")?,
                        status,
                    });
                }
            }
            continue;
        }
        // Only base64 lines belong to a section; anything else (a kernel
        // message that slipped in) is not part of the job's output.
        let is_b64 = !line.is_empty()
            && line
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=');
        if section == Section::None || !is_b64 {
            continue;
        }
        if let Some(n) = last_len.filter(|n| *n != B64_LINE) {
            return Err(JobError::Malformed(format!(
                "the job's output was cut on the console: a line of {n} base64 characters \
                 (not {B64_LINE}) came before more output, so other console text broke into \
                 it and part of the output is lost"
            )));
        }
        last_len = Some(line.len());
        match section {
            Section::Stdout => out.push_str(line),
            _ => err.push_str(line),
        }
    }
    Err(JobError::NoResult)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn parses_framed_output_among_other_console_text() {
        let n = "0123abcd";
        let console = format!(
            "[    0.1] booting\nOSSO-JOB {n} STDOUT\n{}\n[    1.2] virtio: noise\nOSSO-JOB {n} STDERR\n{}\nOSSO-JOB {n} EXIT 3\nreboot\n",
            b64(b"hello\nworld\n"),
            b64(b"oops\n")
        );
        let out = parse_output(&console, n).unwrap();
        assert_eq!(out.stdout, b"hello\nworld\n");
        assert_eq!(out.stderr, b"oops\n");
        assert_eq!(out.status, 3);
    }

    /// `base64 -w 76`, as the guest prints it.
    fn wrapped(s: &[u8]) -> String {
        let b = b64(s);
        b.as_bytes()
            .chunks(B64_LINE)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn a_kernel_message_between_lines_costs_nothing_inside_one_is_an_error() {
        let n = "00ff";
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let lines: Vec<String> = wrapped(&data).lines().map(String::from).collect();
        assert!(lines.len() > 3);
        // Between two lines: skipped, nothing lost.
        let mut between = lines.clone();
        between.insert(
            2,
            "[   38.3] rcu: INFO: rcu_sched self-detected stall".into(),
        );
        let console = format!(
            "OSSO-JOB {n} STDOUT\n{}\nOSSO-JOB {n} STDERR\nOSSO-JOB {n} EXIT 0\n",
            between.join("\n")
        );
        assert_eq!(parse_output(&console, n).unwrap().stdout, data);
        // Inside a line: its first part is lost with the message, and the
        // short rest gives it away, even where the rest would still decode.
        let mut inside = lines.clone();
        let (a, b) = inside[1].split_at(36);
        let (a, b) = (a.to_string(), b.to_string());
        inside[1] = format!("{a}[   38.3] rcu: INFO: stall");
        inside.insert(2, b);
        let console = format!(
            "OSSO-JOB {n} STDOUT\n{}\nOSSO-JOB {n} STDERR\nOSSO-JOB {n} EXIT 0\n",
            inside.join("\n")
        );
        let e = parse_output(&console, n).unwrap_err();
        assert!(matches!(e, JobError::Malformed(_)), "{e}");
        assert!(e.to_string().contains("cut on the console"), "{e}");
    }

    #[test]
    fn other_nonces_and_missing_results_are_not_taken() {
        let console = format!(
            "OSSO-JOB forged STDOUT\n{}\nOSSO-JOB forged STDERR\nOSSO-JOB forged EXIT 0\n",
            b64(b"fake")
        );
        assert!(matches!(
            parse_output(&console, "real"),
            Err(JobError::NoResult)
        ));
        assert!(matches!(
            parse_output("OSSO-JOB n EXIT zero\n", "n"),
            Err(JobError::Malformed(_))
        ));
        assert!(matches!(
            parse_output("OSSO-JOB n EXIT 0\n", "n"),
            Err(JobError::Malformed(_))
        ));
    }

    #[test]
    fn job_is_appended_at_a_four_byte_boundary() {
        let base = vec![0x1f, 0x8b, 1, 2, 3, 4, 5];
        let job = prepare(&base, "echo hi\n").unwrap();
        assert_eq!(&job.initrd[..7], &base[..]);
        assert_eq!(job.initrd[7], 0, "zero padding");
        assert_eq!(
            &job.initrd[8..10],
            &[0x1f, 0x8b],
            "a gzip member starts at offset 8"
        );
        assert_eq!(job.nonce.len(), 32);
        let other = prepare(&base, "echo hi\n").unwrap();
        assert_ne!(job.nonce, other.nonce, "a fresh nonce per job");
        // The appended archive holds the script and the nonce.
        let mut cpio = Vec::new();
        flate2::read::GzDecoder::new(&job.initrd[8..])
            .read_to_end(&mut cpio)
            .unwrap();
        let text = String::from_utf8_lossy(&cpio);
        assert!(text.contains("osso/job") && text.contains("echo hi") && text.contains(&job.nonce));
    }
}

//! What Switchyard's tests and load generator ask of the machine they run
//! on, written once: the open-file limit raised for thousands of sockets,
//! and a process's resident memory read from `/proc`.

use std::io;

/// Why a process's resident memory could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RssError {
    /// `/proc/<pid>/status` could not be read (the process is gone).
    #[error("reading /proc/{pid}/status: {source}")]
    Read {
        /// The process.
        pid: u32,
        /// The error.
        source: io::Error,
    },
    /// The status has no `VmRSS` line (a kernel thread, or a zombie).
    #[error("no VmRSS in /proc/{0}/status")]
    Missing(u32),
}

/// Raises this process's open-file limit to its hard limit (a test or a
/// load generator that holds thousands of sockets). Best effort: the limit
/// stays as it was if the kernel refuses.
pub fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// The resident set size of process `pid`, in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> Result<u64, RssError> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|source| RssError::Read { pid, source })?;
    parse_vm_rss(&status).ok_or(RssError::Missing(pid))
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process_and_refuses_what_is_not_there() {
        assert!(rss_kib(std::process::id()).expect("own rss") > 0);
        assert!(matches!(rss_kib(u32::MAX), Err(RssError::Read { .. })));
        assert_eq!(parse_vm_rss("Name:\tx\nVmRSS:\t  1234 kB\n"), Some(1234));
        assert_eq!(parse_vm_rss("Name:\tkthreadd\n"), None);
    }

    #[test]
    fn the_soft_limit_reaches_the_hard_one() {
        raise_fd_limit();
        // SAFETY: getrlimit with a valid pointer to a local struct.
        let limit = unsafe {
            let mut limit = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
            limit
        };
        assert_eq!(limit.rlim_cur, limit.rlim_max);
    }
}

//! The standard `process_*` metric families both roles export (the names
//! `prometheus_client` uses), read from `/proc/self` on Linux. Here rather than in
//! `protocol`, which does no I/O.

use protocol::prom::TextWriter;

/// The standard `process_*` families (the names `prometheus_client` exports), read from
/// `/proc/self` on Linux. The start time comes from `/proc` too, else from `fallback_start`.
pub fn write_process_metrics(w: &mut TextWriter, fallback_start: Option<f64>) {
    let p = ProcessStats::read();
    let mut one = |name: &str, kind: &str, help: &str, v: Option<f64>| {
        if let Some(v) = v {
            w.header(name, kind, help);
            w.sample(name, &[], v);
        }
    };
    one(
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
        p.cpu_seconds,
    );
    one(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
        p.resident_bytes,
    );
    one(
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory size in bytes.",
        p.virtual_bytes,
    );
    one(
        "process_open_fds",
        "gauge",
        "Number of open file descriptors.",
        p.open_fds,
    );
    one(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds.",
        p.start_time.or(fallback_start),
    );
}

/// What `/proc/self` says about this process; `None` where it cannot be read.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessStats {
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<f64>,
    pub virtual_bytes: Option<f64>,
    pub open_fds: Option<f64>,
    /// Seconds since the Unix epoch.
    pub start_time: Option<f64>,
}

impl ProcessStats {
    pub fn read() -> Self {
        // utime and stime are fields 14 and 15 of /proc/self/stat, in USER_HZ ticks (100 on
        // Linux); the command name (field 2) may hold spaces, so count from its closing ')'.
        // starttime (field 22) counts ticks since boot, whose epoch time is /proc/stat's btime.
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let fields: Vec<&str> = stat
            .rfind(')')
            .map(|i| stat[i + 1..].split_whitespace().collect())
            .unwrap_or_default();
        let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
        let cpu_seconds = field(14).zip(field(15)).map(|(u, s)| (u + s) / 100.0);
        let btime = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<f64>().ok())
        });
        let start_time = btime.zip(field(22)).map(|(b, t)| b + t / 100.0);
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
                .map(|k| k * 1024.0)
        };
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as f64);
        ProcessStats {
            cpu_seconds,
            resident_bytes: kib("VmRSS:"),
            virtual_bytes: kib("VmSize:"),
            open_fds,
            start_time,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_metrics_read_this_process() {
        let p = ProcessStats::read();
        if cfg!(target_os = "linux") {
            assert!(p.resident_bytes.unwrap_or(0.0) > 1e5, "{p:?}");
            assert!(p.virtual_bytes.unwrap_or(0.0) >= p.resident_bytes.unwrap_or(0.0));
            assert!(p.open_fds.unwrap_or(0.0) >= 3.0, "{p:?}");
            assert!(p.cpu_seconds.is_some(), "{p:?}");
        }
        if let Some(start) = p.start_time {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            assert!(
                start <= now + 1.0 && start > now - 86400.0 * 365.0,
                "{start} vs {now}"
            );
        }
        let mut w = TextWriter::new();
        write_process_metrics(&mut w, Some(1.5e9));
        let page = w.finish();
        assert!(
            page.contains("# TYPE process_start_time_seconds gauge\n"),
            "{page}"
        );
        assert!(page.contains("process_resident_memory_bytes "), "{page}");
    }
}

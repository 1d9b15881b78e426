//! CPU time of a process from /proc/PID/stat (user + system), so a report can say which side
//! saturated. Linux only.

use std::time::Duration;

/// Clock ticks per second (`getconf CLK_TCK`; 100 on every Linux we know of).
pub fn ticks_per_second() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// utime + stime of `pid` ("self" for this process).
pub fn cpu_time(pid: &str, ticks: u64) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat, ticks)
}

/// Fields 14 and 15 of /proc/PID/stat; the command name (field 2) may hold spaces and parens,
/// so fields are counted from the last `)`.
pub fn parse_stat(stat: &str, ticks: u64) -> Option<Duration> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // after ")": state(3) ppid(4) ... utime is field 14 -> index 11 here
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 1000 / ticks.max(1)))
}

/// Resident memory of `pid` in bytes (VmRSS).
pub fn rss_bytes(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_are_read_past_odd_command_names() {
        let stat = "1234 (my (odd) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4 0 100 1000 10 18446744073709551615";
        assert_eq!(parse_stat(stat, 100), Some(Duration::from_secs(3)));
        assert_eq!(parse_stat("garbage", 100), None);
    }

    #[test]
    fn this_process_has_a_cpu_time_and_a_resident_size() {
        assert!(cpu_time("self", ticks_per_second()).is_some());
        assert!(rss_bytes("self").is_some_and(|b| b > 0));
    }
}

//! What Linux's `/proc` says about this process and its threads: their names and the CPU time
//! they used (user + system).

use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

/// One live thread of this process.
pub struct Task {
    pub tid: u64,
    /// Its name (`comm`: at most 15 bytes).
    pub name: String,
    /// The CPU time it used so far.
    pub cpu: Duration,
}

/// The kernel's clock ticks per second (USER_HZ, what `/proc` counts CPU time in), asked of
/// `getconf CLK_TCK` once.
pub fn ticks_per_second() -> u64 {
    static HZ: OnceLock<u64> = OnceLock::new();
    *HZ.get_or_init(|| {
        let out = Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .expect("getconf runs (it comes with the C library)");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("getconf CLK_TCK said {out:?}"))
    })
}

/// The name and CPU time in a `/proc/.../stat` line; `None` if it is not one.
fn parse_stat(stat: &str) -> Option<(String, Duration)> {
    // The name is in parentheses and may hold spaces and parentheses: it ends at the last one.
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let fields: Vec<&str> = stat.get(close + 2..)?.split_whitespace().collect();
    // After the name: state is field 3 of the full line, utime and stime fields 14 and 15.
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let cpu = Duration::from_nanos(ticks * 1_000_000_000 / ticks_per_second());
    Some((stat[open + 1..close].to_string(), cpu))
}

/// The CPU time this process used so far, all its threads (ended ones too) together.
pub fn process_cpu() -> Duration {
    cpu_of("self")
}

/// The CPU time process `pid` (a child of this one) used so far, all its threads together.
pub fn child_cpu(pid: u32) -> Duration {
    cpu_of(&pid.to_string())
}

fn cpu_of(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/stat is readable: {e}"));
    parse_stat(&stat)
        .unwrap_or_else(|| panic!("not a stat line: {stat}"))
        .1
}

/// The live threads of this process (a thread that ends while they are listed is left out).
pub fn tasks() -> Vec<Task> {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task is readable on Linux")
        .flatten()
        .filter_map(|task| {
            let tid = task.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
            let (name, cpu) = parse_stat(&stat)?;
            Some(Task { tid, name, cpu })
        })
        .collect()
}

/// The names of this process's live threads, one per thread.
pub fn thread_names() -> Vec<String> {
    tasks().into_iter().map(|t| t.name).collect()
}

/// The CPU time used so far by the live threads of this process named `name`.
pub fn threads_cpu(name: &str) -> Duration {
    tasks()
        .into_iter()
        .filter(|t| t.name == name)
        .map(|t| t.cpu)
        .sum()
}

//! The standard `process_*` metrics, read from `/proc/self` at each scrape
//! (a few small reads; nothing is kept between scrapes). Written here
//! rather than taken from a crate: the crates that do it bring a whole
//! `/proc` parser for six numbers.

use super::exposition::Exposition;
use super::families;

/// What `/proc` says about this process.
#[derive(Debug, Default, PartialEq)]
struct Figures {
    cpu_seconds: f64,
    resident_bytes: u64,
    virtual_bytes: u64,
    start_time_seconds: f64,
}

/// Appends the `process_*` families; a figure `/proc` does not give is
/// left out (its family is still listed, with its HELP).
pub fn render(out: &mut Exposition<'_>) {
    let figures = read();
    let open_fds = std::fs::read_dir("/proc/self/fd").map(|dir| dir.count()).ok();
    let max_fds = max_fds();
    let samples = [
        (
            &families::PROCESS_CPU_SECONDS_TOTAL,
            figures.as_ref().map(|f| f.cpu_seconds),
        ),
        (
            &families::PROCESS_RESIDENT_MEMORY_BYTES,
            figures.as_ref().map(|f| f.resident_bytes as f64),
        ),
        (
            &families::PROCESS_VIRTUAL_MEMORY_BYTES,
            figures.as_ref().map(|f| f.virtual_bytes as f64),
        ),
        // read_dir's own descriptor is not counted: it was closed by then.
        (
            &families::PROCESS_OPEN_FDS,
            open_fds.map(|n| n.saturating_sub(1) as f64),
        ),
        (&families::PROCESS_MAX_FDS, max_fds.map(|n| n as f64)),
        (
            &families::PROCESS_START_TIME_SECONDS,
            figures.as_ref().map(|f| f.start_time_seconds),
        ),
    ];
    for (family, value) in samples {
        let mut family = out.family(family);
        if let Some(value) = value {
            family.value(&[], value);
        }
    }
}

fn read() -> Option<Figures> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let boot = std::fs::read_to_string("/proc/stat").ok()?;
    // SAFETY: sysconf has no preconditions.
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    parse(&stat, &boot, ticks, page)
}

/// Reads `/proc/self/stat` (utime, stime, starttime, vsize, rss) and the
/// boot time of `/proc/stat`, with the clock ticks per second and the
/// page size.
fn parse(stat: &str, boot: &str, ticks: i64, page: i64) -> Option<Figures> {
    if ticks <= 0 || page <= 0 {
        return None;
    }
    // The command name (field 2) may hold spaces and parentheses: the
    // fields that follow start after its last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): field N is fields[N - 3].
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    let ticks = ticks as f64;
    let boot_time: u64 = boot
        .lines()
        .find_map(|line| line.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(Figures {
        cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
        virtual_bytes: field(23)?,
        resident_bytes: field(24)? * page as u64,
        start_time_seconds: boot_time as f64 + field(22)? as f64 / ticks,
    })
}

/// The soft limit of open files.
fn max_fds() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the rlimit it is given.
    let read = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (read == 0).then_some(limit.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_after_the_command_name() {
        // A command name with a space and a parenthesis, as comm can be.
        let stat = "4242 (my (odd) agent) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 150 0 0 20 0 9 0 5000 104857600 2560 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0";
        let boot = "cpu  1 2 3\nbtime 1700000000\nprocesses 10\n";
        let figures = parse(stat, boot, 100, 4096).unwrap();
        assert_eq!(
            figures,
            Figures {
                cpu_seconds: 4.0,
                resident_bytes: 2560 * 4096,
                virtual_bytes: 104_857_600,
                start_time_seconds: 1_700_000_050.0,
            }
        );
        assert_eq!(parse("garbage", boot, 100, 4096), None);
        assert_eq!(parse(stat, "no boot time here", 100, 4096), None);
    }

    #[test]
    fn this_process_has_figures() {
        let figures = read().expect("/proc/self/stat and /proc/stat are readable on Linux");
        assert!(figures.resident_bytes > 0 && figures.virtual_bytes >= figures.resident_bytes);
        assert!(figures.start_time_seconds > 1_600_000_000.0);
        assert!(max_fds().is_some_and(|n| n > 0));
    }
}

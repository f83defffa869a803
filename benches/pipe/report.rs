//! What the bench measured, and its markdown: the tables, the machine, and the targets.

use std::fmt::Write as _;
use std::path::Path;

use crate::bulk::{size_label, BESIDE_CALLS};
use crate::http2::Proto;
use crate::load::{ConnMode, Sample};
use crate::{cluster, fanout, queue, scale};

/// The markers between which the results live in an existing markdown file.
pub const BEGIN: &str = "<!-- bench:pipe:begin -->";
/// See [`BEGIN`].
pub const END: &str = "<!-- bench:pipe:end -->";

/// The small-request ratios to the baseline documented in docs/BENCHMARKS.md before
/// streaming, the latest there: run A of "Before and after the restructuring and hardening",
/// 2026-11-30 19:38 UTC, full mode, the new binary (`b305968`): target key, keep-alive
/// connections, median of the per-run ratios. (The results block between the markers, of
/// 2026-11-21, has 53–63%: a quieter machine and an older binary.) The targets table compares
/// this run's ratios with them.
const DOCUMENTED: [(&str, usize, f64); 6] = [
    ("c2s", 1, 0.61),
    ("c2s", 32, 0.44),
    ("c2s", 256, 0.57),
    ("s2c", 1, 0.62),
    ("s2c", 32, 0.42),
    ("s2c", 256, 0.57),
];
/// Where [`DOCUMENTED`] comes from, for the report.
const DOCUMENTED_RUN: &str =
    "docs/BENCHMARKS.md, \"Before and after\", run A of 2026-11-30 19:38 UTC, binary b305968";

/// The share of the baseline's req/s the pipe must reach at 32 and 256 connections (issue 17).
const REQUEST_TARGET: f64 = 0.70;
/// Bulk through the pipe must reach this share of a plain rustls copy, at every size.
const BULK_TARGET: f64 = 0.8;
/// The server's memory per idle connection must stay at or under this, KiB.
const IDLE_KIB_TARGET: f64 = 20.0;

/// One run of one point, reduced.
#[derive(Clone, Copy, Debug)]
pub struct Run {
    /// Requests per second.
    pub rps: f64,
    /// Latency quantiles, µs.
    pub p50: f64,
    /// 99th percentile, µs.
    pub p99: f64,
    /// 99.9th percentile, µs.
    pub p999: f64,
    /// Failed requests.
    pub errors: u64,
    /// CPU µs of the serving processes per request (NaN if not measured).
    pub cpu_us: f64,
    /// CPU µs of the load generator per request (NaN if not measured).
    pub load_cpu_us: f64,
}

impl From<&Sample> for Run {
    fn from(s: &Sample) -> Run {
        Run {
            rps: s.rps(),
            p50: s.micros(0.5),
            p99: s.micros(0.99),
            p999: s.micros(0.999),
            errors: s.errors,
            cpu_us: s.cpu_micros_per_request(),
            load_cpu_us: s.load_cpu_micros_per_request(),
        }
    }
}

/// The runs of one request point: a target at a number of connections.
#[derive(Clone, Debug)]
pub struct Series {
    /// Short key of the target (`baseline`, `c2s`, `s2c`, `c2s-metrics`, `old-c2s` and
    /// `old-s2c` for the binary compared with, `pol-c2s` and `pol-s2c` for the pair with a
    /// policy, `h2` and `yamux` for the reference pairs).
    pub key: &'static str,
    /// What the target is.
    pub label: &'static str,
    /// Concurrent connections.
    pub conns: usize,
    /// Keep-alive or a connection per request.
    pub mode: ConnMode,
    /// One entry per run.
    pub runs: Vec<Run>,
}

/// The runs of one bulk point.
#[derive(Clone, Debug, Default)]
pub struct Bulk {
    /// Bytes per transfer.
    pub size: usize,
    /// MB/s through the pipe, per run (NaN for a run the pipe refused with 413).
    pub pipe: Vec<f64>,
    /// Whether the pipe refused the file with 413 (over its frame limit, before streaming).
    pub pipe_refused: bool,
    /// MB/s over plain rustls, per run.
    pub rustls: Vec<f64>,
    /// CPU seconds per GB of the pipe's two nodes, per run (NaN when refused).
    pub pipe_cpu: Vec<f64>,
    /// CPU seconds per GB of the load generator receiving the pipe's HTTP answer, per run
    /// (NaN when refused).
    pub pipe_load_cpu: Vec<f64>,
    /// CPU seconds per GB of the plain rustls copy, both ends together, per run.
    pub rustls_cpu: Vec<f64>,
    /// The reference pairs measured (HTTP/2, yamux), in the order asked for.
    pub refs: Vec<RefBulk>,
}

/// The runs of one bulk point through a reference pair.
#[derive(Clone, Debug)]
pub struct RefBulk {
    /// Which pair.
    pub proto: Proto,
    /// MB/s, per run.
    pub mbps: Vec<f64>,
    /// CPU seconds per GB of its two processes, per run.
    pub cpu: Vec<f64>,
}

impl RefBulk {
    /// No run yet.
    pub fn new(proto: Proto) -> RefBulk {
        RefBulk {
            proto,
            mbps: Vec::new(),
            cpu: Vec::new(),
        }
    }
}

impl Bulk {
    /// Per-run pipe / plain rustls.
    fn vs_rustls(&self) -> Vec<f64> {
        per_run(&self.pipe, &self.rustls)
    }
}

/// `a[i] / b[i]` for the runs where both are figures.
fn per_run(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter()
        .zip(b)
        .map(|(a, b)| a / b)
        .filter(|x| x.is_finite())
        .collect()
}

/// The median CPU s/GB of the runs, or `-`.
fn cpu_cell(values: &[f64]) -> String {
    let x = median(values);
    if x.is_finite() {
        format!("{x:.2}")
    } else {
        "-".into()
    }
}

/// `1,234 | 1,100–1,300` of MB/s runs, or `refused (413)`.
fn mbps_cells(values: &[f64], refused: bool) -> String {
    let (lo, hi) = min_max(values);
    if refused && !lo.is_finite() {
        return "refused (413) | —".into();
    }
    let note = if refused { " (some runs 413)" } else { "" };
    format!("{:.0}{note} | {lo:.0}–{hi:.0}", median(values))
}

/// The machine and the moment.
#[derive(Clone, Debug, Default)]
pub struct Machine {
    /// Cores.
    pub cores: usize,
    /// CPU model.
    pub cpu: String,
    /// Kernel release.
    pub kernel: String,
    /// `rustc --version`.
    pub rustc: String,
    /// UTC date and time of the start.
    pub date: String,
    /// Load average (1 min) at the start and at the end.
    pub load: (String, String),
}

/// Everything one invocation measured.
#[derive(Debug, Default)]
pub struct Report {
    /// `smoke`, `quick` or `full`.
    pub mode: &'static str,
    /// How each point was measured, in words.
    pub method: String,
    /// The machine.
    pub machine: Machine,
    /// Request points.
    pub series: Vec<Series>,
    /// Bulk points.
    pub bulk: Vec<Bulk>,
    /// Small calls beside the largest bulk transfer, one per run.
    pub beside: Vec<crate::bulk::Beside>,
    /// The scale scenario.
    pub scale: Option<scale::Outcome>,
    /// The queue scenario.
    pub queue: Option<queue::Outcome>,
    /// The fanout scenario.
    pub fanout: Option<fanout::Outcome>,
    /// The cluster scenario.
    pub cluster: Option<cluster::Outcome>,
    /// The cluster scenario was asked for but skipped (no nats-server).
    pub cluster_skipped: bool,
    /// statsd datagrams received while metrics were on.
    pub statsd_datagrams: u64,
    /// The command that produced it.
    pub command: String,
    /// The other `restpipe` binary compared with (`--compare-bin`), if any.
    pub compare: Option<String>,
    /// The rules of the policy measured against none (`--policy-rules`), if any.
    pub policy_rules: Option<usize>,
    /// The floor of one request's added latency: the p50 round trip (µs) of one small TLS
    /// record each way between this process and the plain rustls server, one per run.
    pub floor: Vec<f64>,
    /// The reference pairs that stopped mid-run (a process exited, or a point failed), and
    /// why: their figures are those of the runs before.
    pub refs_stopped: Vec<(Proto, String)>,
}

fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// Min and max of the finite values (infinite when there is none).
fn min_max(values: &[f64]) -> (f64, f64) {
    let finite = values.iter().copied().filter(|x| x.is_finite());
    let min = finite.clone().fold(f64::INFINITY, f64::min);
    let max = finite.fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}

/// `12,345`
fn thousands(x: f64) -> String {
    if !x.is_finite() {
        return "-".into();
    }
    let n = x.round() as i64;
    let digits = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

fn pct(x: f64) -> String {
    if !x.is_finite() {
        return "-".into();
    }
    format!("{:.0}%", x * 100.0)
}

fn pct_range(values: &[f64]) -> String {
    let (lo, hi) = min_max(values);
    if !lo.is_finite() {
        return "-".into();
    }
    format!("{:.0}–{:.0}%", lo * 100.0, hi * 100.0)
}

/// The verdict on "restpipe beats `other`" from per-run ratios restpipe / `other`.
fn beats_verdict(ratios: &[f64], other: &str) -> String {
    let (lo, hi) = min_max(ratios);
    if ratios.len() < 3 {
        "not judged (fewer than 3 runs)".into()
    } else if lo > 1.0 {
        "met: restpipe ahead in every run".into()
    } else if hi < 1.0 {
        format!("**missed**: {other} ahead in every run")
    } else {
        format!(
            "**not shown**: ranges overlap (median {})",
            pct(median(ratios))
        )
    }
}

impl Series {
    fn col(&self, f: impl Fn(&Run) -> f64) -> Vec<f64> {
        self.runs.iter().map(f).collect()
    }

    /// Median p50, µs.
    pub fn p50(&self) -> f64 {
        median(&self.col(|r| r.p50))
    }

    /// Median CPU µs per request, or `-`.
    fn cpu_cell(&self) -> String {
        let x = median(&self.col(|r| r.cpu_us));
        if x.is_finite() {
            format!("{x:.1}")
        } else {
            "-".into()
        }
    }
}

impl Report {
    fn find(&self, key: &str, conns: usize, mode: ConnMode) -> Option<&Series> {
        self.series
            .iter()
            .find(|s| s.key == key && s.conns == conns && s.mode == mode)
    }

    /// Per-run ratios of `key`'s req/s to `base`'s at the same point.
    fn ratios(&self, key: &str, base: &str, conns: usize, mode: ConnMode) -> Option<Vec<f64>> {
        let a = self.find(key, conns, mode)?;
        let b = self.find(base, conns, mode)?;
        Some(
            a.runs
                .iter()
                .zip(&b.runs)
                .map(|(a, b)| a.rps / b.rps)
                .collect(),
        )
    }

    /// What the machine's cores allow the pipe at each keep-alive point, from the CPU its
    /// requests cost: the pipe's two nodes and the load generator share the cores, so the
    /// pipe answers at most `cores / (their CPU µs per request)` requests a second, whatever
    /// it does with its time. Beside the baseline's req/s of the same run, that is the highest
    /// share of the baseline the pipe can reach without spending less CPU per request; the
    /// last column is the CPU per request of the two nodes at which [`REQUEST_TARGET`] would
    /// fit at all. At one connection a request waits on wake-ups more than on CPU, so the
    /// bound says little there.
    fn request_bound_table(&self, out: &mut String) {
        let ka = ConnMode::KeepAlive;
        let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
        let mut rows = String::new();
        for s in self
            .series
            .iter()
            .filter(|s| s.mode == ka && matches!(s.key, "c2s" | "s2c"))
        {
            let Some(base) = self.find("baseline", s.conns, ka) else {
                continue;
            };
            let total = |r: &Run| r.cpu_us + r.load_cpu_us;
            let bound: Vec<f64> = s.runs.iter().map(|r| cores * 1e6 / total(r)).collect();
            let base_rps = base.col(|r| r.rps);
            let share = per_run(&bound, &base_rps);
            // At the target, the pipe answers REQUEST_TARGET × the baseline's req/s with all
            // the cores; less the load generator's share, that is what its nodes may spend.
            let allowed: Vec<f64> = s
                .runs
                .iter()
                .zip(&base_rps)
                .map(|(r, b)| cores * 1e6 / (REQUEST_TARGET * b) - r.load_cpu_us)
                .collect();
            if share.is_empty() || !allowed.iter().all(|x| x.is_finite()) {
                continue;
            }
            let _ = writeln!(
                rows,
                "| {} | {} | {} | {} | {} | {} | {} | {} ({}) | {} |",
                s.label,
                s.conns,
                cpu_cell(&base.col(|r| r.cpu_us)),
                cpu_cell(&base.col(|r| r.load_cpu_us)),
                cpu_cell(&s.col(|r| r.cpu_us)),
                cpu_cell(&s.col(|r| r.load_cpu_us)),
                thousands(median(&bound)),
                pct(median(&share)),
                pct_range(&share),
                cpu_cell(&allowed)
            );
        }
        if rows.is_empty() {
            return;
        }
        let _ = writeln!(
            out,
            "What {cores:.0} cores allow the requests: the pipe's two nodes and the load generator (this bench's process) share them, so the pipe cannot answer more than cores / (their CPU µs per request) requests a second. Per run against the baseline's req/s of the same run, then median (min–max). The last column is the CPU per request the pipe's two nodes could spend, at this load generator's cost, for {} of the baseline to fit in the cores at all.\n",
            pct(REQUEST_TARGET)
        );
        out.push_str("| path | conns | baseline CPU µs/req | its load generator µs/req | pipe nodes CPU µs/req | its load generator µs/req | pipe's bound, req/s | bound / baseline req/s (min–max) | pipe nodes' CPU µs/req that would allow the target |\n|---|---:|---:|---:|---:|---:|---:|---|---:|\n");
        out.push_str(&rows);
        out.push('\n');
    }

    fn request_table(&self, out: &mut String, mode: ConnMode) {
        out.push_str("| path | conns | req/s (median) | req/s min–max | p50 µs | p99 µs | p99.9 µs | CPU µs/req | errors | vs baseline (min–max) |\n");
        out.push_str("|---|---:|---:|---|---:|---:|---:|---:|---:|---|\n");
        let mut conns: Vec<usize> = self
            .series
            .iter()
            .filter(|s| s.mode == mode)
            .map(|s| s.conns)
            .collect();
        conns.dedup();
        for s in self.series.iter().filter(|s| s.mode == mode) {
            let rps = s.col(|r| r.rps);
            let (lo, hi) = min_max(&rps);
            let base = if s.key == "c2s-metrics" {
                "c2s"
            } else {
                "baseline"
            };
            let versus = match self.ratios(s.key, base, s.conns, mode) {
                Some(r) if s.key != "baseline" => {
                    let of = if base == "c2s" { " of metrics off" } else { "" };
                    format!("{}{of} ({})", pct(median(&r)), pct_range(&r))
                }
                _ => "—".into(),
            };
            let errors: u64 = s.runs.iter().map(|r| r.errors).sum();
            let _ = writeln!(
                out,
                "| {} | {} | {} | {}–{} | {:.0} | {:.0} | {:.0} | {} | {} | {} |",
                s.label,
                s.conns,
                thousands(median(&rps)),
                thousands(lo),
                thousands(hi),
                s.p50(),
                median(&s.col(|r| r.p99)),
                median(&s.col(|r| r.p999)),
                s.cpu_cell(),
                errors,
                versus
            );
        }
    }

    /// Old binary against new, per keep-alive point and direction: req/s and p50 of the
    /// baseline, the old and the new, the ratios to the baseline of the same run, and whether
    /// new and old differ beyond the noise.
    fn compare_table(&self, out: &mut String, bin: &str) {
        let ka = ConnMode::KeepAlive;
        let _ = writeln!(
            out,
            "### Old binary against new (`--compare-bin {bin}`)\n\nReq/s and p50 are medians over runs; ratios are per run against the baseline of the same run, median (min–max). A difference is called beyond the noise when every run of one binary beats every run of the other: the two ranges of ratios to the baseline do not overlap (req/s), or the two ranges of p50 do not.\n"
        );
        out.push_str("| direction | conns | baseline req/s | old req/s | new req/s | baseline p50 µs | old p50 µs | new p50 µs | old CPU µs/req | new CPU µs/req | old / baseline | new / baseline | new / old | beyond the noise? |\n");
        out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|\n");
        let mut conns: Vec<usize> = self
            .series
            .iter()
            .filter(|s| s.mode == ka && s.key == "old-c2s")
            .map(|s| s.conns)
            .collect();
        conns.dedup();
        for (key, name) in [("c2s", "client→server"), ("s2c", "server→client")] {
            let old_key = if key == "c2s" { "old-c2s" } else { "old-s2c" };
            for &c in &conns {
                let (Some(base), Some(old), Some(new)) = (
                    self.find("baseline", c, ka),
                    self.find(old_key, c, ka),
                    self.find(key, c, ka),
                ) else {
                    continue;
                };
                let (Some(old_r), Some(new_r)) = (
                    self.ratios(old_key, "baseline", c, ka),
                    self.ratios(key, "baseline", c, ka),
                ) else {
                    continue;
                };
                let new_old: Vec<f64> = new_r.iter().zip(&old_r).map(|(n, o)| n / o).collect();
                let rps = |s: &Series| thousands(median(&s.col(|r| r.rps)));
                let (olo, ohi) = min_max(&old_r);
                let (nlo, nhi) = min_max(&new_r);
                let (op, np) = (min_max(&old.col(|r| r.p50)), min_max(&new.col(|r| r.p50)));
                let mut said = Vec::new();
                if nhi < olo {
                    said.push("new fewer req/s in every run");
                } else if nlo > ohi {
                    said.push("new more req/s in every run");
                }
                if np.0 > op.1 {
                    said.push("new later p50 in every run");
                } else if np.1 < op.0 {
                    said.push("new earlier p50 in every run");
                }
                let verdict = if old.runs.len() < 3 {
                    "not judged (fewer than 3 runs)".to_string()
                } else if said.is_empty() {
                    "no (ranges overlap)".to_string()
                } else {
                    format!("**yes**: {}", said.join("; "))
                };
                let _ = writeln!(
                    out,
                    "| {name} | {c} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {} | {} | {} ({}) | {} ({}) | {} ({}) | {verdict} |",
                    rps(base),
                    rps(old),
                    rps(new),
                    base.p50(),
                    old.p50(),
                    new.p50(),
                    old.cpu_cell(),
                    new.cpu_cell(),
                    pct(median(&old_r)),
                    pct_range(&old_r),
                    pct(median(&new_r)),
                    pct_range(&new_r),
                    pct(median(&new_old)),
                    pct_range(&new_old),
                );
            }
        }
        out.push('\n');
    }

    /// A policy against none, per keep-alive point and direction: req/s and p50 of the
    /// baseline, the pair without a policy and the pair with one, the ratios to the baseline
    /// of the same run, the per-run ratio policy / no policy, and whether the two differ
    /// beyond the noise (their ranges of ratios to the baseline, or of p50, do not overlap).
    fn policy_table(&self, out: &mut String, rules: usize) {
        let ka = ConnMode::KeepAlive;
        let _ = writeln!(
            out,
            "### A policy of {rules} rules against none\n\nBoth nodes of the second pair run with `--policy` (a file of {rules} `[[allow]]` rules: {} for peers that never call, then the one that allows the bench's client and server, so that every call walks every rule); policy / no policy is per run, then median (min–max).\n",
            rules - 1
        );
        out.push_str("| direction | conns | baseline req/s | no policy req/s | policy req/s | baseline p50 µs | no policy p50 µs | policy p50 µs | no policy / baseline | policy / baseline | policy / no policy | beyond the noise? |\n");
        out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|\n");
        let mut conns: Vec<usize> = self
            .series
            .iter()
            .filter(|s| s.mode == ka && s.key == "pol-c2s")
            .map(|s| s.conns)
            .collect();
        conns.dedup();
        for (key, pol_key, name) in [
            ("c2s", "pol-c2s", "client→server"),
            ("s2c", "pol-s2c", "server→client"),
        ] {
            for &c in &conns {
                let (Some(base), Some(none), Some(pol)) = (
                    self.find("baseline", c, ka),
                    self.find(key, c, ka),
                    self.find(pol_key, c, ka),
                ) else {
                    continue;
                };
                let (Some(none_r), Some(pol_r), Some(pol_none)) = (
                    self.ratios(key, "baseline", c, ka),
                    self.ratios(pol_key, "baseline", c, ka),
                    self.ratios(pol_key, key, c, ka),
                ) else {
                    continue;
                };
                let rps = |s: &Series| thousands(median(&s.col(|r| r.rps)));
                let (nlo, nhi) = min_max(&none_r);
                let (plo, phi) = min_max(&pol_r);
                let (np, pp) = (min_max(&none.col(|r| r.p50)), min_max(&pol.col(|r| r.p50)));
                let mut said = Vec::new();
                if phi < nlo {
                    said.push("policy fewer req/s in every run");
                } else if plo > nhi {
                    said.push("policy more req/s in every run");
                }
                if pp.0 > np.1 {
                    said.push("policy later p50 in every run");
                } else if pp.1 < np.0 {
                    said.push("policy earlier p50 in every run");
                }
                let verdict = if pol.runs.len() < 3 {
                    "not judged (fewer than 3 runs)".to_string()
                } else if said.is_empty() {
                    "no (ranges overlap)".to_string()
                } else {
                    format!("**yes**: {}", said.join("; "))
                };
                let _ = writeln!(
                    out,
                    "| {name} | {c} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {} ({}) | {} ({}) | {} ({}) | {verdict} |",
                    rps(base),
                    rps(none),
                    rps(pol),
                    base.p50(),
                    none.p50(),
                    pol.p50(),
                    pct(median(&none_r)),
                    pct_range(&none_r),
                    pct(median(&pol_r)),
                    pct_range(&pol_r),
                    pct(median(&pol_none)),
                    pct_range(&pol_none),
                );
            }
        }
        out.push('\n');
    }

    fn bulk_table(&self, out: &mut String) {
        // The reference pairs, from the first point (every point has the same).
        let refs: Vec<Proto> = self
            .bulk
            .first()
            .map(|b| b.refs.iter().map(|r| r.proto).collect())
            .unwrap_or_default();
        out.push_str("### Bulk: one file through the pipe vs a plain rustls copy\n\n");
        if self.bulk.iter().any(|b| b.pipe_refused) {
            out.push_str("The pipe answered 413 for a file over what its `get_file` serves (a binary without streamed bodies serves up to 15/16 of `--max-frame`).\n\n");
        }
        out.push_str("CPU s/GB: CPU seconds (user + system) of the two serving processes per 10^9 bytes, over every transfer of the run, median over runs: steadier than MB/s on a shared machine.\n\n");
        out.push_str("| size | pipe MB/s (median) | min–max | pipe CPU s/GB | plain rustls MB/s | min–max | pipe / rustls (min–max) |");
        for proto in &refs {
            let name = proto.name();
            let _ = write!(
                out,
                " {name} MB/s | min–max | {name} CPU s/GB | pipe / {name} (min–max) |"
            );
        }
        out.push_str("\n|---:|---:|---|---:|---:|---|---|");
        for _ in &refs {
            out.push_str("---:|---|---:|---|");
        }
        out.push('\n');
        for b in &self.bulk {
            let ratios = b.vs_rustls();
            let _ = write!(
                out,
                "| {} | {} | {} | {} | {} ({}) |",
                size_label(b.size),
                mbps_cells(&b.pipe, b.pipe_refused),
                cpu_cell(&b.pipe_cpu),
                mbps_cells(&b.rustls, false),
                pct(median(&ratios)),
                pct_range(&ratios)
            );
            for r in &b.refs {
                let vs = per_run(&b.pipe, &r.mbps);
                let _ = write!(
                    out,
                    " {} | {} | {} ({}) |",
                    mbps_cells(&r.mbps, false),
                    cpu_cell(&r.cpu),
                    pct(median(&vs)),
                    pct_range(&vs)
                );
            }
            out.push('\n');
        }
        out.push('\n');
        self.bulk_bound_table(out);
        self.beside_table(out);
    }

    /// Small calls beside the largest transfer (fairness): the p99 during it against idle.
    fn beside_table(&self, out: &mut String) {
        let Some(first) = self.beside.first() else {
            return;
        };
        let _ = writeln!(
            out,
            "### Small calls beside a {} transfer (fairness)\n\n{BESIDE_CALLS} sequential `GET {}` through the pipe, idle; then as many as fit, back to back, while the {} file crosses the same pipe (fetched on another connection, from its request to its last byte). Their replies travel the way the file does. Issue 13's aim: p99 during within 5× idle and under 20 ms.\n\n| run | idle p99 µs | during p99 µs | during / idle | calls during | transfer MB/s |\n|---:|---:|---:|---:|---:|---:|",
            size_label(first.size),
            crate::bulk::TIME_PATH,
            size_label(first.size),
        );
        for (run, b) in self.beside.iter().enumerate() {
            let _ = writeln!(
                out,
                "| {} | {:.0} | {:.0} | {:.1}× | {} | {:.0} |",
                run + 1,
                b.idle_p99_us,
                b.busy_p99_us,
                b.busy_p99_us / b.idle_p99_us,
                b.busy_calls,
                b.mb_per_s
            );
        }
        out.push('\n');
    }

    /// What the machine's cores allow the pipe, from the CPU each transfer cost: the pipe's
    /// two nodes and the load generator that reads its HTTP answer run on the same cores, so
    /// the pipe can move at most `cores / (their CPU s per GB)` GB/s, whatever its protocol.
    /// Put beside the plain copy (two ends, no HTTP leg), that is the highest share of plain
    /// rustls the pipe can reach on this machine without spending less CPU per byte.
    fn bulk_bound_table(&self, out: &mut String) {
        let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
        let measured: Vec<&Bulk> = self
            .bulk
            .iter()
            .filter(|b| !b.pipe_load_cpu.is_empty() && !b.rustls_cpu.is_empty())
            .collect();
        if measured.is_empty() {
            return;
        }
        let _ = writeln!(
            out,
            "What {cores:.0} cores allow: every process of a transfer shares them (the pipe's two nodes and the load generator reading its HTTP answer; the copy server and its TLS client). A transfer cannot go faster than cores / (its CPU s/GB) GB/s, so the pipe's share of plain rustls is bounded by its CPU per byte before any protocol question. Per run, then median (min–max).\n"
        );
        out.push_str("| size | pipe nodes CPU s/GB | load generator CPU s/GB | pipe total CPU s/GB | plain rustls CPU s/GB (both ends) | cores the plain copy kept busy | pipe's bound at this CPU, MB/s | bound / plain rustls (min–max) |\n|---:|---:|---:|---:|---:|---:|---:|---|\n");
        for b in measured {
            let total: Vec<f64> = b
                .pipe_cpu
                .iter()
                .zip(&b.pipe_load_cpu)
                .map(|(n, l)| n + l)
                .collect();
            let bound: Vec<f64> = total.iter().map(|t| cores / t * 1000.0).collect();
            let busy: Vec<f64> = b
                .rustls
                .iter()
                .zip(&b.rustls_cpu)
                .map(|(mbps, cpu)| mbps * cpu / 1000.0)
                .collect();
            let share = per_run(&bound, &b.rustls);
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {:.2} | {:.0} | {} ({}) |",
                size_label(b.size),
                cpu_cell(&b.pipe_cpu),
                cpu_cell(&b.pipe_load_cpu),
                cpu_cell(&total),
                cpu_cell(&b.rustls_cpu),
                median(&busy),
                median(&bound),
                pct(median(&share)),
                pct_range(&share)
            );
        }
        out.push('\n');
    }

    /// restpipe and a reference pair side by side: the keep-alive points (pipe client→server,
    /// the same direction as the pair's front door to its server) and the bulk points.
    fn ref_table(&self, out: &mut String, proto: Proto) {
        let ka = ConnMode::KeepAlive;
        let (key, name) = (proto.key(), proto.name());
        let conns: Vec<usize> = self
            .series
            .iter()
            .filter(|s| s.key == key && s.mode == ka)
            .map(|s| s.conns)
            .collect();
        let bulk: Vec<(&Bulk, &RefBulk)> = self
            .bulk
            .iter()
            .filter_map(|b| Some((b, b.refs.iter().find(|r| r.proto == proto)?)))
            .collect();
        if conns.is_empty() && bulk.is_empty() {
            return;
        }
        let shape = match proto {
            Proto::H2 => format!("an axum HTTP/1 front door on loopback (as the baseline) forwarding every request over one shared HTTP/2 connection (hyper's HTTP/2 client, tokio-rustls, TLS 1.3, the dev client certificate) to an HTTP/2 server (hyper over tokio-rustls, client certificates required); hyper's default HTTP/2 settings except {} concurrent streams", crate::http2::MAX_STREAMS),
            Proto::Yamux => format!("an axum HTTP/1 front door on loopback (as the baseline) that opens a yamux stream per request on one TLS connection (tokio-rustls, TLS 1.3, the dev client certificate) and sends the request over it with hyper's HTTP/1.1 client, to a yamux server (client certificates required) serving hyper's HTTP/1.1 on each stream; yamux's default configuration except {} streams per connection instead of 512 (yamux closes the whole connection when one stream too many is opened, which 256 connections reached)", crate::yamux_pair::MAX_STREAMS),
        };
        let _ = writeln!(
            out,
            "### restpipe against {name}, side by side\n\nThe same shape on {name}: {shape}. The server answers `get_time`'s JSON, or streams the file in 256 KiB chunks. Two processes, as the pair of nodes: the front door with its client, and the server. The same load generator, interleaved run by run with the pipe; restpipe / {name} is per run, then median (min–max). Requests: the pipe client→server; bulk: the pipe server→client (the server node fetches a file from the client node's `files` handlers).\n"
        );
        for (_, why) in self.refs_stopped.iter().filter(|(p, _)| *p == proto) {
            let _ = writeln!(
                out,
                "**The {name} pair stopped** ({}); its figures below are those of the runs before, and a point with fewer than 3 runs is not judged.\n",
                why.replace('\n', " ")
            );
        }
        if !conns.is_empty() {
            let _ = writeln!(out, "| conns | pipe req/s | {name} req/s | pipe p50 µs | {name} p50 µs | pipe CPU µs/req | {name} CPU µs/req | pipe / baseline | {name} / baseline | pipe / {name} | verdict (req/s) |");
            out.push_str("|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|\n");
            for &c in &conns {
                let (Some(pipe), Some(other)) = (self.find("c2s", c, ka), self.find(key, c, ka))
                else {
                    continue;
                };
                let rps = |s: &Series| thousands(median(&s.col(|r| r.rps)));
                let pb = self.ratios("c2s", "baseline", c, ka).unwrap_or_default();
                let ob = self.ratios(key, "baseline", c, ka).unwrap_or_default();
                let po = self.ratios("c2s", key, c, ka).unwrap_or_default();
                let _ = writeln!(
                    out,
                    "| {c} | {} | {} | {:.0} | {:.0} | {} | {} | {} ({}) | {} ({}) | {} ({}) | {} |",
                    rps(pipe),
                    rps(other),
                    pipe.p50(),
                    other.p50(),
                    pipe.cpu_cell(),
                    other.cpu_cell(),
                    pct(median(&pb)),
                    pct_range(&pb),
                    pct(median(&ob)),
                    pct_range(&ob),
                    pct(median(&po)),
                    pct_range(&po),
                    beats_verdict(&po, name)
                );
            }
            out.push('\n');
        }
        if !bulk.is_empty() {
            let _ = writeln!(out, "| size | pipe MB/s | {name} MB/s | plain rustls MB/s | pipe / {name} | {name} / rustls | pipe CPU s/GB | {name} CPU s/GB | verdict (MB/s) |");
            out.push_str("|---:|---:|---:|---:|---|---|---:|---:|---|\n");
            for (b, r) in bulk {
                let vs = per_run(&b.pipe, &r.mbps);
                let other_rustls = per_run(&r.mbps, &b.rustls);
                let pipe = if b.pipe_refused && vs.is_empty() {
                    "refused (413)".to_string()
                } else {
                    format!("{:.0}", median(&b.pipe))
                };
                let _ = writeln!(
                    out,
                    "| {} | {pipe} | {:.0} | {:.0} | {} ({}) | {} ({}) | {} | {} | {} |",
                    size_label(b.size),
                    median(&r.mbps),
                    median(&b.rustls),
                    pct(median(&vs)),
                    pct_range(&vs),
                    pct(median(&other_rustls)),
                    pct_range(&other_rustls),
                    cpu_cell(&b.pipe_cpu),
                    cpu_cell(&r.cpu),
                    if vs.is_empty() {
                        "**missed**: the pipe did not serve it".to_string()
                    } else {
                        beats_verdict(&vs, name)
                    }
                );
            }
            out.push('\n');
        }
    }

    /// The whole report as markdown.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let m = &self.machine;
        let _ = writeln!(
            out,
            "Results of `{}` ({} mode), {}.\n",
            self.command, self.mode, m.date
        );
        let _ = writeln!(
            out,
            "Machine: {} cores, {}; Linux {}; {}. Load average (1 min) {} at the start, {} at the end: the machine is shared, so ratios measured in the same run are what count.\n",
            m.cores, m.cpu, m.kernel, m.rustc, m.load.0, m.load.1
        );
        let _ = writeln!(out, "{}\n", self.method);

        if self.series.iter().any(|s| s.mode == ConnMode::KeepAlive) {
            out.push_str("### `GET .../time` over keep-alive connections\n\n");
            self.request_table(&mut out, ConnMode::KeepAlive);
            if self.statsd_datagrams > 0 {
                let _ = writeln!(
                    out,
                    "\nWith metrics on, the bench's statsd socket received {} datagrams (read and discarded).",
                    thousands(self.statsd_datagrams as f64)
                );
            }
            out.push('\n');
            self.request_bound_table(&mut out);
        }
        if let Some(bin) = &self.compare {
            self.compare_table(&mut out, bin);
        }
        if let Some(rules) = self.policy_rules {
            self.policy_table(&mut out, rules);
        }
        if self.series.iter().any(|s| s.mode == ConnMode::Close) {
            out.push_str("### A new TCP connection per request (`Connection: close`)\n\n");
            self.request_table(&mut out, ConnMode::Close);
            out.push('\n');
        }
        if !self.bulk.is_empty() {
            self.bulk_table(&mut out);
        }
        for proto in [Proto::H2, Proto::Yamux] {
            self.ref_table(&mut out, proto);
        }
        if let Some(sc) = &self.scale {
            out.push_str("### Idle clients on one server\n\n");
            let _ = writeln!(
                out,
                "{} client certificates issued in {:.1} s. Server with no client: RSS {:.1} MiB, CPU {:.2}% of one core.\n",
                sc.issued.0,
                sc.issued.1,
                sc.rss_empty as f64 / 1048576.0,
                sc.cpu_empty_pct
            );
            out.push_str("| clients | server RSS | memory per idle connection | server CPU (% of one core) | client nodes' CPU (bench process) | time to connect the clients added |\n");
            out.push_str("|---:|---:|---:|---:|---:|---:|\n");
            for p in &sc.points {
                let _ = writeln!(
                    out,
                    "| {} | {:.1} MiB | {} ({:.1} KiB) | {:.2}% | {:.2}% | {:.1} s |",
                    thousands(p.clients as f64),
                    p.rss as f64 / 1048576.0,
                    thousands(p.bytes_per_client),
                    p.bytes_per_client / 1024.0,
                    p.server_cpu_pct,
                    p.clients_cpu_pct,
                    p.connect_secs
                );
            }
            let r = &sc.restart;
            let _ = writeln!(
                out,
                "\nRestart with {} clients (server killed with SIGKILL, started again on the same port; ready {:.2} s after the kill): {} back, {} missing. Reconnect time from the restart: p10 {:.2} s, p50 {:.2} s, p90 {:.2} s, p99 {:.2} s, max {:.2} s; the server's `/health` counted every client {:.1} s after the restart. Most reconnects in any 100 ms: {}. Reconnects per second after the restart: {:?}. Server RSS once all were back: {:.1} MiB.",
                thousands(r.clients as f64),
                r.server_ready_secs,
                thousands(r.times.len() as f64),
                r.missing,
                r.quantile(0.1),
                r.quantile(0.5),
                r.quantile(0.9),
                r.quantile(0.99),
                r.quantile(1.0),
                r.server_counted_secs,
                r.peak_per_100ms,
                r.per_second,
                r.rss_after as f64 / 1048576.0
            );
            out.push('\n');
        }
        if let Some(c) = &self.cluster {
            cluster_tables(&mut out, c);
        } else if self.cluster_skipped {
            out.push_str("### Cluster\n\nSkipped: no nats-server on this machine (set `NATS_SERVER` or install it).\n\n");
        }
        if let Some(q) = &self.queue {
            queue_table(&mut out, q);
        }
        if let Some(f) = &self.fanout {
            fanout_table(&mut out, f);
        }
        self.targets(&mut out);
        out
    }

    fn targets(&self, out: &mut String) {
        let mut rows: Vec<(String, String, String)> = Vec::new();
        let verdict = |ok: bool, aim: Option<bool>| -> String {
            match (ok, aim) {
                (true, Some(true)) => "met (aim met too)".into(),
                (true, Some(false)) => "met (aim missed)".into(),
                (true, None) => "met".into(),
                (false, _) => "**missed**".into(),
            }
        };
        let ka = ConnMode::KeepAlive;
        // Issue 17: one request near the floor, and ≥ 70% of the baseline at 32 and 256.
        for (key, name) in [("c2s", "client→server"), ("s2c", "server→client")] {
            if let (Some(a), Some(b)) = (self.find(key, 1, ka), self.find("baseline", 1, ka)) {
                let added = a.p50() - b.p50();
                let floor = if self.floor.is_empty() {
                    String::new()
                } else {
                    let (lo, hi) = min_max(&self.floor);
                    format!(
                        "; the floor, one small TLS record each way between two processes: p50 {:.0} µs ({lo:.0}–{hi:.0})",
                        median(&self.floor)
                    )
                };
                rows.push((
                    format!("1 conn, pipe {name}: adds ≤ 25 µs p50 over baseline (issue 17)"),
                    format!(
                        "+{added:.0} µs ({:.0} vs {:.0} µs){floor}",
                        a.p50(),
                        b.p50()
                    ),
                    verdict(added <= 25.0, None),
                ));
            }
            for conns in [32, 256] {
                if let Some(r) = self.ratios(key, "baseline", conns, ka) {
                    let x = median(&r);
                    rows.push((
                        format!(
                            "{conns} keep-alive conns, pipe {name}: ≥ {} of baseline req/s (issue 17)",
                            pct(REQUEST_TARGET)
                        ),
                        format!("{} ({})", pct(x), pct_range(&r)),
                        verdict(x >= REQUEST_TARGET, None),
                    ));
                }
            }
        }
        for (key, name) in [("c2s", "client→server"), ("s2c", "server→client")] {
            if let Some(r) = self.ratios(key, "baseline", 32, ka) {
                let x = median(&r);
                rows.push((
                    format!(
                        "32 keep-alive conns, pipe {name}: ≥ 40% of baseline req/s (aim > 50%)"
                    ),
                    format!("{} ({})", pct(x), pct_range(&r)),
                    verdict(x >= 0.40, Some(x > 0.50)),
                ));
            }
        }
        for (key, name) in [("c2s", "client→server"), ("s2c", "server→client")] {
            if let (Some(a), Some(b)) = (self.find(key, 1, ka), self.find("baseline", 1, ka)) {
                let added = a.p50() - b.p50();
                rows.push((
                    format!("1 conn, pipe {name}: adds ≤ 60 µs p50 over baseline (aim 30 µs)"),
                    format!("+{added:.0} µs ({:.0} vs {:.0} µs)", a.p50(), b.p50()),
                    verdict(added <= 60.0, Some(added <= 30.0)),
                ));
            }
        }
        if let Some(r) = self.ratios("c2s", "baseline", 8, ConnMode::Close) {
            let x = median(&r);
            rows.push((
                "`Connection: close` at 8 conns: ≥ 50% of baseline".into(),
                format!("{} ({})", pct(x), pct_range(&r)),
                verdict(x >= 0.5, None),
            ));
        }
        for conns in [1, 32, 256] {
            let (Some(on), Some(off)) = (
                self.find("c2s-metrics", conns, ka),
                self.find("c2s", conns, ka),
            ) else {
                continue;
            };
            let Some(r) = self.ratios("c2s-metrics", "c2s", conns, ka) else {
                continue;
            };
            let x = median(&r);
            // Worse beyond the noise: every run with metrics on is worse than every run
            // without, in req/s or in p50 latency.
            let (on_rps, off_rps) = (min_max(&on.col(|r| r.rps)), min_max(&off.col(|r| r.rps)));
            let (on_p50, off_p50) = (min_max(&on.col(|r| r.p50)), min_max(&off.col(|r| r.p50)));
            let slower = on_rps.1 < off_rps.0;
            let later = on_p50.0 > off_p50.1;
            let added = on.p50() - off.p50();
            rows.push((
                format!("metrics on vs off, {conns} conns: no measurable slowdown"),
                format!(
                    "req/s {} of off ({}); p50 {:.0} vs {:.0} µs ({:+.0} µs)",
                    pct(x),
                    pct_range(&r),
                    on.p50(),
                    off.p50(),
                    added
                ),
                if on.runs.len() < 3 {
                    "not judged (fewer than 3 runs)".into()
                } else if slower || later {
                    format!(
                        "**missed**: {}",
                        match (slower, later) {
                            (true, true) => "fewer req/s and later p50 in every run",
                            (true, false) => "fewer req/s in every run",
                            _ => "later p50 in every run",
                        }
                    )
                } else if x >= 0.95 && added <= 0.1 * off.p50() {
                    "met (within the noise)".into()
                } else {
                    format!(
                        "**not shown**: median {:.0}% fewer req/s, ranges overlap",
                        (1.0 - x) * 100.0
                    )
                },
            ));
        }
        for b in &self.bulk {
            let ratios = b.vs_rustls();
            let x = median(&ratios);
            rows.push((
                format!(
                    "{} bulk: ≥ {} of plain rustls",
                    size_label(b.size),
                    pct(BULK_TARGET)
                ),
                if ratios.is_empty() {
                    "the pipe refused it (413)".into()
                } else {
                    format!("{} ({})", pct(x), pct_range(&ratios))
                },
                verdict(!ratios.is_empty() && x >= BULK_TARGET, None),
            ));
        }
        for (key, conns, documented) in DOCUMENTED {
            let Some(r) = self.ratios(key, "baseline", conns, ka) else {
                continue;
            };
            let name = if key == "c2s" {
                "client→server"
            } else {
                "server→client"
            };
            let (lo, hi) = min_max(&r);
            rows.push((
                format!(
                    "{conns} keep-alive conn(s), pipe {name}: ratio to baseline not below the documented {}¹",
                    pct(documented)
                ),
                format!("{} ({})", pct(median(&r)), pct_range(&r)),
                if r.len() < 3 {
                    "not judged (fewer than 3 runs)".into()
                } else if hi < documented {
                    "**missed**: below in every run".into()
                } else if lo > documented {
                    "met: above in every run".into()
                } else {
                    "met (within the noise)".into()
                },
            ));
        }
        for proto in [Proto::H2, Proto::Yamux] {
            let (key, name) = (proto.key(), proto.name());
            for c in [1, 32, 256] {
                let (Some(pipe), Some(other), Some(r)) = (
                    self.find("c2s", c, ka),
                    self.find(key, c, ka),
                    self.ratios("c2s", key, c, ka),
                ) else {
                    continue;
                };
                rows.push((
                    format!(
                        "{c} keep-alive conn(s): restpipe (client→server) beats {name} in req/s"
                    ),
                    format!(
                        "{} of {name} ({}); p50 {:.0} vs {:.0} µs; CPU {} vs {} µs/req",
                        pct(median(&r)),
                        pct_range(&r),
                        pipe.p50(),
                        other.p50(),
                        pipe.cpu_cell(),
                        other.cpu_cell()
                    ),
                    beats_verdict(&r, name),
                ));
            }
            for b in &self.bulk {
                let Some(other) = b.refs.iter().find(|r| r.proto == proto) else {
                    continue;
                };
                let r = per_run(&b.pipe, &other.mbps);
                rows.push((
                    format!("{} bulk: restpipe beats {name} in MB/s", size_label(b.size)),
                    if r.is_empty() {
                        "the pipe refused it (413)".into()
                    } else {
                        format!(
                            "{} of {name} ({}); {:.0} vs {:.0} MB/s; CPU {} vs {} s/GB",
                            pct(median(&r)),
                            pct_range(&r),
                            median(&b.pipe),
                            median(&other.mbps),
                            cpu_cell(&b.pipe_cpu),
                            cpu_cell(&other.cpu)
                        )
                    },
                    if r.is_empty() {
                        "**missed**: the pipe did not serve it".into()
                    } else {
                        beats_verdict(&r, name)
                    },
                ));
            }
        }
        if let Some(sc) = &self.scale {
            for p in &sc.points {
                let kib = p.bytes_per_client / 1024.0;
                // With a few clients the RSS moves by whole pages and arenas: not judged.
                let judged = p.clients >= 1000;
                rows.push((
                    format!(
                        "{} idle clients: server memory per idle connection ≤ {IDLE_KIB_TARGET:.0} KiB ((RSS - RSS with no client) / clients)",
                        thousands(p.clients as f64)
                    ),
                    format!("{kib:.1} KiB"),
                    if judged {
                        verdict(kib <= IDLE_KIB_TARGET, None)
                    } else {
                        "not judged (fewer than 1,000 clients)".into()
                    },
                ));
            }
            if let Some(p) = sc.points.last() {
                rows.push((
                    format!(
                        "{} idle clients: heartbeats < 10% of one core",
                        thousands(p.clients as f64)
                    ),
                    format!("{:.2}%", p.server_cpu_pct),
                    verdict(p.server_cpu_pct < 10.0, None),
                ));
            }
            let r = &sc.restart;
            let all = r.quantile(1.0);
            rows.push((
                format!(
                    "{} clients back within 30 s of a restart, no thundering herd",
                    thousands(r.clients as f64)
                ),
                format!(
                    "all in {all:.1} s (p50 {:.2} s, p90 {:.2} s); at most {} in any 100 ms; {} missing",
                    r.quantile(0.5),
                    r.quantile(0.9),
                    r.peak_per_100ms,
                    r.missing
                ),
                verdict(r.missing == 0 && all <= 30.0, None),
            ));
        }
        if let Some(c) = &self.cluster {
            let f = &c.failover;
            let all = scale::quantile(&f.times, 1.0);
            rows.push((
                format!(
                    "a replica of {} killed (SIGKILL): its clients back on the others within the reconnect backoff (≤ 15 s with the defaults)",
                    c.replicas
                ),
                format!(
                    "{} of {} back, all in {all:.1} s (p50 {:.2} s); {} missing",
                    thousands(f.times.len() as f64),
                    thousands(f.clients as f64),
                    scale::quantile(&f.times, 0.5),
                    f.missing
                ),
                verdict(f.missing == 0 && all <= 15.0, None),
            ));
        }
        if rows.is_empty() {
            return;
        }
        out.push_str("### Targets\n\n| target | measured (median, min–max over runs) | verdict |\n|---|---|---|\n");
        let documented = rows.iter().any(|(t, _, _)| t.ends_with('¹'));
        for (t, m, v) in rows {
            let _ = writeln!(out, "| {t} | {m} | {v} |");
        }
        if documented {
            let _ = writeln!(
                out,
                "\n¹ Per-run req/s ratio to the baseline of the same run, against the median documented before streaming ({DOCUMENTED_RUN}); missed only when every run is below it."
            );
        }
        out.push('\n');
    }
}

/// The cluster scenario: routed against local calls, idle clients over the replicas, and a
/// replica's failover.
fn cluster_tables(out: &mut String, c: &cluster::Outcome) {
    let _ = writeln!(
        out,
        "### Cluster: {} replicas over NATS\n\nReal processes: a nats-server and {} `restpipe server --cluster` replicas on this machine. *Local*: `GET /client/dev-client/time` on the replica the client process is connected to; *routed*: the same on another replica, which carries it over NATS to the holder. Interleaved run by run (the order swapped every other run); routed / local is per run, median (min–max). CPU µs/req: the processes serving the call (local: the holder and the client; routed: both replicas, the client and nats-server).\n",
        c.replicas, c.replicas
    );
    out.push_str("| conns | local req/s | routed req/s | routed / local (min–max) | local p50 µs | routed p50 µs | p50 added µs | local p99 µs | routed p99 µs | local CPU µs/req | routed CPU µs/req | errors |\n");
    out.push_str("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let find = |key: &str, conns: usize| c.series.iter().find(|s| s.key == key && s.conns == conns);
    let mut conns: Vec<usize> = c.series.iter().map(|s| s.conns).collect();
    conns.dedup();
    for n in conns {
        let (Some(local), Some(routed)) = (find("cluster-local", n), find("cluster-routed", n))
        else {
            continue;
        };
        let rps = |s: &Series| s.col(|r| r.rps);
        let r = per_run(&rps(routed), &rps(local));
        let errors: u64 = local
            .runs
            .iter()
            .chain(&routed.runs)
            .map(|r| r.errors)
            .sum();
        let _ = writeln!(
            out,
            "| {n} | {} | {} | {} ({}) | {:.0} | {:.0} | {:+.0} | {:.0} | {:.0} | {} | {} | {errors} |",
            thousands(median(&rps(local))),
            thousands(median(&rps(routed))),
            pct(median(&r)),
            pct_range(&r),
            local.p50(),
            routed.p50(),
            routed.p50() - local.p50(),
            median(&local.col(|r| r.p99)),
            median(&routed.col(|r| r.p99)),
            local.cpu_cell(),
            routed.cpu_cell(),
        );
    }
    let (idle, issued, connected) = c.idle;
    let _ = writeln!(
        out,
        "\n{} idle client nodes in the bench process, each knowing every replica (a random one first); certificates issued in {issued:.1} s, all connected and counted by the replicas in {connected:.1} s. RSS and CPU from `/proc` over a {:.0} s window after the settle time:\n",
        thousands(idle as f64),
        c.window_secs
    );
    out.push_str("| process | clients held | RSS at its start | RSS with the clients | CPU (% of one core) |\n");
    out.push_str("|---|---:|---:|---:|---:|\n");
    let mib = |b: u64| b as f64 / 1048576.0;
    for r in &c.idle_replicas {
        let _ = writeln!(
            out,
            "| replica {} | {} | {:.1} MiB | {:.1} MiB | {:.2}% |",
            r.name,
            thousands(r.clients as f64),
            mib(r.rss_start),
            mib(r.rss),
            r.cpu_pct
        );
    }
    let _ = writeln!(
        out,
        "| nats-server | — | {:.1} MiB | {:.1} MiB | {:.2}% |",
        mib(c.nats.0),
        mib(c.nats.1),
        c.nats.2
    );
    let _ = writeln!(
        out,
        "| the client nodes (bench process) | {} | — | — | {:.2}% |",
        thousands(idle as f64),
        c.clients_cpu_pct
    );
    let f = &c.failover;
    let last = scale::quantile(&f.times, 1.0);
    let seconds = f.per_second.len().max(1);
    let _ = writeln!(
        out,
        "\nFailover: {} clients kept on replica {} (the one that held the most; its other clients were shut down first), {} on the others left alone; {} killed with SIGKILL. Back (connected again, each client's own moment): {} of {}, {} missing; from the kill: p10 {:.2} s, p50 {:.2} s, p90 {:.2} s, max {last:.2} s. The survivors' `/health` counted every client {:.2} s after the kill, spread {:?}. Reconnects per second from the kill: {:?}: at most {} in one second against {:.0} per second on average over the {seconds} s until the last; at most {} in any 100 ms.\n",
        thousands(f.clients as f64),
        f.killed,
        thousands(f.others as f64),
        f.killed,
        thousands(f.times.len() as f64),
        thousands(f.clients as f64),
        f.missing,
        scale::quantile(&f.times, 0.1),
        scale::quantile(&f.times, 0.5),
        scale::quantile(&f.times, 0.9),
        f.counted_secs,
        f.spread,
        f.per_second,
        f.per_second.iter().copied().max().unwrap_or(0),
        f.times.len() as f64 / seconds as f64,
        f.peak_per_100ms
    );
}

/// Queued delivery against the raw redb commit rate of the same runs.
fn queue_table(out: &mut String, q: &queue::Outcome) {
    let _ = writeln!(
        out,
        "### Queued delivery (`X-Event-Delivery: queued`) against the store's raw commit rate\n\nA server node queues `GET /client/dev-client/time` (202 once the event is committed with an fsync) and delivers each event to its connected client node, whose `get_time` answers; no warm-up, every 202 counts. *Accepted*: 202s per second over the window (p50: the 202's latency). *Delivered*: events accepted / the time from the start of the load until the node's queue is empty. *Raw*: this process's own redb loop (one {}-byte record per write transaction, `Durability::Immediate`) into a file in the same directory as the node's `--data-dir` ({}, {}), measured in the same runs. Ratios are per run against the raw rate of the same run, median (min–max).\n",
        queue::RAW_RECORD, q.place.0, q.place.1
    );
    out.push_str(
        "| what | conns | events/s (median) | min–max | p50 µs | / raw commits (min–max) |\n",
    );
    out.push_str("|---|---:|---:|---|---:|---|\n");
    for (what, values) in [
        ("raw redb commits (1 record, fsync each)", &q.raw),
        (
            "raw redb commits, a busy thread beside the loop²",
            &q.raw_awake,
        ),
    ] {
        let (lo, hi) = min_max(values);
        let r = per_run(values, &q.raw);
        let _ = writeln!(
            out,
            "| {what} | 1 | {} | {}–{} | - | {} ({}) |",
            thousands(median(values)),
            thousands(lo),
            thousands(hi),
            pct(median(&r)),
            pct_range(&r)
        );
    }
    for p in &q.points {
        for (what, values, p50) in [
            ("accepted (202, fsync'd)", &p.accepted, Some(&p.p50)),
            ("delivered (accept to empty queue)", &p.delivered, None),
        ] {
            let r = per_run(values, &q.raw);
            let (lo, hi) = min_max(values);
            let _ = writeln!(
                out,
                "| {what} | {} | {} | {}–{} | {} | {} ({}) |",
                p.conns,
                thousands(median(values)),
                thousands(lo),
                thousands(hi),
                p50.map_or("-".into(), |v| format!("{:.0}", median(v))),
                pct(median(&r)),
                pct_range(&r)
            );
        }
    }
    out.push_str("\n² On this VM a commit loop alone waits on each fsync with its vCPU halted and is woken late; the node commits among busy threads (its own, the load generator's). The second raw row keeps a core busy with a spinning thread in the bench process meanwhile: when it is well above the first, the raw rate alone is not a ceiling here, and the node's rates can exceed it.\n\n");
}

/// Publish fan-out to the subscribed clients, per phase.
fn fanout_table(out: &mut String, f: &fanout::Outcome) {
    let _ = writeln!(
        out,
        "### Publish fan-out to {} subscribed clients\n\n`POST /publish/{}` ({}-byte bodies) on a `restpipe server` process's front door, on one keep-alive connection; {} client nodes in the bench process, each subscribed to the topic with an `event_*` handler, connected and subscribed (the server's `/status` counting them) in {:.1} s. *Paced*: at a fixed rate; *burst*: back to back, each event sent once the last was answered 202. Latency: from just before the `POST` is written to the client's handler call (one clock, the bench process), over every delivery of the phase. *Published*: events / the time to publish them; *deliveries/s* and *to all, events/s*: deliveries or events / the time from the first publish to the last delivery. A phase fails unless every client got every event, once and in order. CPU (`/proc`, 10 ms ticks) over the same time, % of one core: the server process, and the bench process (the publisher and every client node); \"-\" for a phase shorter than {:.0} s. One run.\n",
        thousands(f.clients as f64),
        fanout::TOPIC,
        fanout::BODY,
        thousands(f.clients as f64),
        f.subscribed_secs,
        fanout::CPU_WINDOW.as_secs_f64(),
    );
    out.push_str("| phase | events | published events/s | deliveries/s | to all, events/s | p50 ms | p99 ms | max ms | clients with every event | server CPU | bench CPU |\n");
    out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let cpu = |pct: Option<f64>| pct.map_or("-".into(), |pct| format!("{pct:.0}%"));
    for p in &f.phases {
        let name = match p.rate {
            Some(rate) => format!("{}, {rate:.0}/s asked", p.name),
            None => p.name.to_string(),
        };
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {} | {:.1} | {:.2} | {:.2} | {:.2} | {} of {} | {} | {} |",
            thousands(p.events as f64),
            thousands(p.published_per_s()),
            thousands(p.deliveries_per_s()),
            p.events_per_s(),
            p.latency_us.0 / 1e3,
            p.latency_us.1 / 1e3,
            p.latency_us.2 / 1e3,
            thousands(p.complete as f64),
            thousands(f.clients as f64),
            cpu(p.cpu_pct.map(|c| c.0)),
            cpu(p.cpu_pct.map(|c| c.1))
        );
    }
    out.push('\n');
}

/// Write `text` to `path`: between the markers if the file has them, else appended with them
/// (a new file holds just the results).
pub fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    let block = format!("{BEGIN}\n{text}{END}\n");
    let new = match std::fs::read_to_string(path) {
        Ok(old) => match (old.find(BEGIN), old.find(END)) {
            (Some(b), Some(e)) if b < e => {
                format!(
                    "{}{block}{}",
                    &old[..b],
                    old[e + END.len()..].trim_start_matches('\n')
                )
            }
            _ => format!("{old}\n{block}"),
        },
        Err(_) => format!("# Benchmarks\n\n{block}"),
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, new)?;
    Ok(())
}

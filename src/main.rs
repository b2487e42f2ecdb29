//! The `tributary` binary: parse the command line, set up logging, run the
//! command from the library, map the outcome to the contract's exit codes
//! (0 ok, 1 found a problem, 2 usage or config error, 3 runtime failure).

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tributary::cli::{Cli, LogFormat};
use tributary::config::ConfigError;

/// mimalloc: see Cargo.toml (measured with perf on the backlog benchmark).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Turns transparent huge pages off for this process. mimalloc asks the kernel
/// for them (`MADV_HUGEPAGE`) on the memory it reserves; every batch frees and
/// allocates tens of MB, and a first touch of memory returned to the OS then
/// faults in and zeroes a whole 2 MiB page. In the backlog benchmark that
/// zeroing was 8 % of the daemon's CPU samples (2 % without huge pages), and
/// the peak RSS is 20-40 MiB lower without them (docs/design.md,
/// "Throughput", eleventh session). mimalloc's own switches do not serve:
/// `MIMALLOC_ALLOW_THP=0` is read before `main` runs, and the crate's `no_thp`
/// feature only drops its `madvise`, which leaves huge pages on hosts whose
/// THP mode is `always`. The process flag covers every mapping, including
/// those mimalloc made already.
#[cfg(target_os = "linux")]
fn no_transparent_huge_pages() {
    // A kernel without the flag refuses it, which leaves the default
    // behaviour: nothing to report.
    let _ = rustix::thread::disable_transparent_huge_pages(true);
}

#[cfg(not(target_os = "linux"))]
fn no_transparent_huge_pages() {}

fn init_tracing(format: Option<LogFormat>) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=error"));
    let human = match format {
        Some(f) => f == LogFormat::Human,
        None => std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if human {
        builder.with_ansi(std::io::stderr().is_terminal()).init();
    } else {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init();
    }
}

fn main() -> ExitCode {
    no_transparent_huge_pages();
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(3);
        }
    };
    match runtime.block_on(tributary::app::execute(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            // `{:#}` prints the whole cause chain on one line.
            eprintln!("error: {err:#}");
            if err.downcast_ref::<ConfigError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(3)
            }
        }
    }
}

//! Command dispatch: each command loads what it needs, does its work through
//! the library, prints human or JSON output, and returns the exit code.

use anyhow::Context;

use crate::check::run_checks;
use crate::cli::{Cli, Command};
use crate::config::Config;
use crate::store::Store;
use tokio_util::sync::CancellationToken;

/// Cancels `token` on SIGINT or SIGTERM.
pub async fn stop_on_signal(token: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
    }
    token.cancel();
}

/// `--source NAME` must name a configured source (a usage error, exit 2).
fn require_source(cfg: &Config, source: &str) -> Result<(), crate::config::ConfigError> {
    if cfg.source(source).is_none() {
        return Err(crate::config::ConfigError::Invalid {
            path: cfg.path.clone(),
            key: "--source".into(),
            message: format!("no source named `{source}` in the config"),
        });
    }
    Ok(())
}

/// Runs one command; `Ok(code)` is the process exit code (0 or 1).
pub async fn execute(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Demo { duration, keep } => crate::demo::demo(duration, keep, cli.json).await,
        Command::Migrate => {
            let cfg = Config::load(&cli.config)?;
            let store = Store::connect(&cfg.sink).await?;
            store.migrate().await?;
            if let Some(months) = cfg.sink.events_retention_months {
                store.drop_old_events(months).await?;
            }
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({ "migrated": true, "schema": cfg.sink.schema })
                );
            } else {
                println!("profile store migrated (schema {})", cfg.sink.schema);
            }
            Ok(0)
        }
        Command::Run { role } => {
            let cfg = Config::load(&cli.config)?;
            if role != crate::cli::Role::All && cfg.kafka.is_none() {
                return Err(crate::config::ConfigError::Invalid {
                    path: cli.config.clone(),
                    key: "kafka".into(),
                    message: format!(
                        "`run --role {}` needs a [kafka] section (brokers, topic_prefix)",
                        if role == crate::cli::Role::Capture {
                            "capture"
                        } else {
                            "apply"
                        }
                    ),
                }
                .into());
            }
            let shutdown = CancellationToken::new();
            tokio::spawn(stop_on_signal(shutdown.clone()));
            crate::daemon::run(cfg, role, shutdown).await?;
            Ok(0)
        }
        Command::Status => {
            let cfg = Config::load(&cli.config)?;
            let s = crate::status::status(&cfg).await?;
            if cli.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&s).context("serialize status")?
                );
            } else {
                crate::status::print_human(&s);
            }
            Ok(0)
        }
        Command::Replay {
            source,
            from_lsn,
            to_lsn,
            dry_run,
        } => {
            let cfg = Config::load(&cli.config)?;
            require_source(&cfg, &source)?;
            let store = Store::connect(&cfg.sink).await?;
            store.migrate().await?;
            let mapper = crate::mapping::Mapper::new(&cfg);
            let r = store
                .replay(
                    &mapper,
                    &source,
                    from_lsn,
                    to_lsn,
                    dry_run,
                    cfg.sink.batch_max_events,
                )
                .await?;
            if cli.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&r).context("serialize replay report")?
                );
            } else {
                let verb = if dry_run { "would change" } else { "changed" };
                println!(
                    "replayed {} events of {source} from {from_lsn}: {} {verb} {} profiles",
                    r.events,
                    if dry_run { "dry run," } else { "" },
                    r.profiles_changed.len()
                );
                for p in r.profiles_changed.iter().take(50) {
                    println!("  profile {p}");
                }
            }
            Ok(0)
        }
        Command::Rebuild => {
            let cfg = Config::load(&cli.config)?;
            let store = Store::connect(&cfg.sink).await?;
            store.migrate().await?;
            let mapper = crate::mapping::Mapper::new(&cfg);
            let r = store.rebuild(&mapper, cfg.sink.batch_max_events).await?;
            if cli.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&r).context("serialize rebuild report")?
                );
            } else {
                println!("rebuilt from {} events: {} profiles", r.events, r.profiles);
            }
            Ok(0)
        }
        Command::Forget { identity } => {
            let cfg = Config::load(&cli.config)?;
            let store = Store::connect(&cfg.sink).await?;
            store.migrate().await?;
            let r = match crate::forget::forget(&store, &cfg, &identity).await {
                Err(e @ crate::forget::ForgetError::Usage(_)) => {
                    anyhow::bail!(crate::config::ConfigError::Invalid {
                        path: cfg.path.clone(),
                        key: "--identity".into(),
                        message: e.to_string(),
                    })
                }
                other => other?,
            };
            if cli.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&r).context("serialize forget report")?
                );
            } else {
                match r.profile_id {
                    Some(p) => println!("forgot profile {p}: {} identifiers suppressed, {} rows and {} events deleted", r.suppressed.len(), r.rows, r.events),
                    None => println!("no profile owns {identity}; it is suppressed from now on"),
                }
            }
            Ok(0)
        }
        Command::Snapshot {
            source,
            table,
            wait_secs,
        } => {
            let cfg = Config::load(&cli.config)?;
            require_source(&cfg, &source)?;
            let store = Store::connect(&cfg.sink).await?;
            store.migrate().await?;
            let r = crate::resnapshot::snapshot(
                &cfg,
                &store,
                &source,
                table.as_deref(),
                std::time::Duration::from_secs(wait_secs),
                crate::progress::Progress::for_terminal(cli.json),
            )
            .await?;
            if cli.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&r).context("serialize snapshot report")?
                );
            } else {
                for t in &r {
                    println!(
                        "{source} {}: {} rows read in {} chunks, {} applied, {} left to newer streamed changes, {} deleted",
                        t.table, t.totals.rows, t.chunks, t.totals.applied, t.totals.skipped, t.totals.deleted
                    );
                }
            }
            Ok(0)
        }
        Command::Reconcile {
            source,
            repair,
            sample,
            wait_secs,
        } => {
            let cfg = Config::load(&cli.config)?;
            let store = Store::connect(&cfg.sink).await?;
            store.migrate().await?;
            let opts = crate::reconcile::Options {
                source,
                repair,
                sample,
                wait: std::time::Duration::from_secs(wait_secs),
                progress: crate::progress::Progress::for_terminal(cli.json),
            };
            let r = crate::reconcile::reconcile(&cfg, &store, &opts).await?;
            if cli.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&r).context("serialize reconcile report")?
                );
            } else {
                crate::reconcile::report::print_summary(&r);
            }
            Ok(u8::from(r.unrepaired() > 0))
        }
        Command::Report { run } => {
            let cfg = Config::load(&cli.config)?;
            let store = Store::connect(&cfg.sink).await?;
            store.migrate().await?;
            use crate::reconcile::report;
            match run.as_deref() {
                None => {
                    let runs = report::runs(&store, 50).await?;
                    if cli.json {
                        println!(
                            "{}",
                            serde_json::to_string_pretty(&runs).context("serialize runs")?
                        );
                    } else {
                        report::print_runs(&runs);
                    }
                }
                Some(which) => {
                    let id = match which {
                        "latest" => None,
                        n => Some(n.parse::<i64>().map_err(|_| crate::config::ConfigError::Invalid {
                            path: cfg.path.clone(),
                            key: "RUN_ID".into(),
                            message: format!("`{n}` is not a run id; give a number from `tributary report`, or `latest`"),
                        })?),
                    };
                    let Some(d) = report::run(&store, id).await? else {
                        anyhow::bail!("no reconciliation run {which}");
                    };
                    if cli.json {
                        println!(
                            "{}",
                            serde_json::to_string_pretty(&d).context("serialize run")?
                        );
                    } else {
                        report::print_run(&d);
                    }
                }
            }
            Ok(0)
        }
        Command::Check => {
            let cfg = Config::load(&cli.config)?;
            let results = run_checks(&cfg).await;
            let failed = results.iter().filter(|r| !r.ok).count();
            if cli.json {
                let doc =
                    serde_json::json!({ "ok": failed == 0, "failed": failed, "checks": results });
                println!(
                    "{}",
                    serde_json::to_string_pretty(&doc).context("serialize check results")?
                );
            } else {
                for r in &results {
                    let mark = if r.ok { "ok  " } else { "FAIL" };
                    println!("{mark} {:<14} {:<28} {}", r.target, r.check, r.detail);
                    if let Some(fix) = &r.fix {
                        println!("     fix: {fix}");
                    }
                }
                println!("{} checks, {failed} failed", results.len());
            }
            Ok(u8::from(failed > 0))
        }
    }
}

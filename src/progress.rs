//! Progress bars for long commands (`snapshot`, `reconcile`) on a terminal.
//!
//! A bar shows rows done, the rate and the time left. It draws only when
//! stderr is a terminal and the command was not asked for `--json`; otherwise
//! it is hidden and costs nothing, so pipes, logs and the daemon's scheduled
//! runs see no control characters.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Where stages draw: the terminal, or nowhere.
#[derive(Clone, Copy, Debug, Default)]
pub struct Progress {
    draw: bool,
}

impl Progress {
    /// Draws on stderr when it is a terminal and `json` is off.
    pub fn for_terminal(json: bool) -> Progress {
        Progress {
            draw: !json && std::io::stderr().is_terminal(),
        }
    }

    /// Never draws.
    pub fn hidden() -> Progress {
        Progress { draw: false }
    }

    /// Starts a stage on its own line: `what` is shown before the bar; with a
    /// `total` there is a bar and an ETA, without one a spinner and the count.
    pub fn stage(&self, what: &str, total: Option<u64>) -> Stage {
        if !self.draw {
            return Stage {
                bar: ProgressBar::hidden(),
            };
        }
        let template = if total.is_some() {
            "{msg:<34} [{bar:30}] {human_pos}/{human_len} rows  {per_sec}  ETA {eta}"
        } else {
            "{spinner} {msg:<32} {human_pos} rows  {per_sec}"
        };
        let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(what.to_owned());
        bar.enable_steady_tick(Duration::from_millis(200));
        Stage { bar }
    }
}

/// One stage's bar; dropping it without [`Stage::done`] clears it.
#[derive(Debug)]
pub struct Stage {
    bar: ProgressBar,
}

impl Stage {
    /// `n` more rows done.
    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
    }

    /// Ends the stage, leaving its final line on screen.
    pub fn done(self) {
        self.bar.finish();
    }
}

//! Throwaway PostgreSQL clusters started from the machine's own server binaries
//! (`initdb` + `pg_ctl`), for `tributary demo` and for the test suite.
//!
//! A cluster lives in a fresh temporary directory, listens on a free loopback
//! port with `wal_level = logical`, trusts local connections, and is stopped
//! (`-m immediate`) and deleted when the [`Cluster`] is dropped. PostgreSQL
//! refuses to run as root, so as root the server runs as the `postgres` OS user.

use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Why a cluster could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No `initdb`/`pg_ctl` found.
    #[error(
        "no PostgreSQL server binaries found (looked on PATH, $PGBIN, /usr/lib/postgresql/*/bin, /usr/pgsql-*/bin): \
         install the server package (e.g. `apt-get install postgresql` or `dnf install postgresql-server`) \
         or set PGBIN to the directory holding initdb and pg_ctl"
    )]
    NoBinaries,
    /// Running as root and there is no unprivileged user to run the server as.
    #[error("running as root, but there is no `postgres` OS user to run the server as: create one (useradd postgres) or run as a normal user")]
    NoServerUser,
    /// A command failed.
    #[error("{what} failed: {detail}")]
    Command {
        /// Which step.
        what: String,
        /// Its output.
        detail: String,
    },
    /// File system trouble.
    #[error("cluster directory: {0}")]
    Io(#[from] io::Error),
}

/// Settings for a throwaway cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// `wal_level` (`logical` unless a test wants to see `check` fail).
    pub wal_level: String,
    /// Extra `postgresql.conf` lines.
    pub extra_conf: Vec<String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            wal_level: "logical".into(),
            extra_conf: Vec::new(),
        }
    }
}

/// A running throwaway cluster; dropped means stopped and deleted.
#[derive(Debug)]
pub struct Cluster {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    run_as: Option<String>,
    owner: Option<(u32, u32)>,
    stopped: bool,
}

/// Finds the directory with `initdb` and `pg_ctl`, preferring `$PGBIN`, then
/// PATH, then the usual Debian and RPM locations (newest version first).
pub fn find_server_binaries() -> Option<PathBuf> {
    let has = |d: &Path| {
        d.join("initdb").is_file() && d.join("pg_ctl").is_file() && d.join("postgres").is_file()
    };
    if let Some(d) = std::env::var_os("PGBIN").map(PathBuf::from) {
        if has(&d) {
            return Some(d);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            if d.join("pg_ctl").is_file() {
                // Debian puts wrappers on PATH; follow the link to the real bin dir.
                let real = std::fs::canonicalize(d.join("pg_ctl"))
                    .ok()
                    .and_then(|p| p.parent().map(Path::to_path_buf));
                for cand in real.into_iter().chain([d.clone()]) {
                    if has(&cand) {
                        return Some(cand);
                    }
                }
            }
        }
    }
    let mut cands: Vec<(u32, PathBuf)> = Vec::new();
    for (root, prefix) in [("/usr/lib/postgresql", ""), ("/usr", "pgsql-")] {
        if let Ok(rd) = std::fs::read_dir(root) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(v) = name
                    .strip_prefix(prefix)
                    .and_then(|v| v.parse::<u32>().ok())
                {
                    let bin = e.path().join("bin");
                    if has(&bin) {
                        cands.push((v, bin));
                    }
                }
            }
        }
    }
    cands.sort();
    cands.pop().map(|(_, p)| p)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

fn uid_gid_of(user: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&user) && f.len() > 3)
            .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Cluster {
    /// `initdb`, configure and start a cluster; blocks until it accepts connections.
    pub fn start(opts: &ClusterOptions) -> Result<Cluster, ClusterError> {
        let bin = find_server_binaries().ok_or(ClusterError::NoBinaries)?;
        let run_as = if is_root() {
            Some("postgres".to_owned())
        } else {
            None
        };
        let owner = match &run_as {
            Some(u) => Some(uid_gid_of(u).ok_or(ClusterError::NoServerUser)?),
            None => None,
        };
        let dir = std::env::temp_dir().join(format!(
            "tributary-pg-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir)?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
        }
        let mut cluster = Cluster {
            dir,
            bin,
            port: 0,
            run_as,
            owner,
            stopped: true,
        };
        let data = cluster.dir.join("data");
        cluster.run(
            "initdb",
            Command::new(cluster.bin.join("initdb"))
                .args([
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                    "-D",
                ])
                .arg(&data),
        )?;
        // A port can be taken between probing and binding: try a few.
        let mut last_err = None;
        for _ in 0..5 {
            cluster.port = free_port()?;
            let conf = format!(
                "port = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nwal_level = {}\n\
                 max_replication_slots = 20\nmax_wal_senders = 20\nfsync = off\nsynchronous_commit = off\n\
                 full_page_writes = off\nshared_buffers = 128MB\nmax_connections = 100\n{}\n",
                cluster.port,
                cluster.dir.display(),
                opts.wal_level,
                opts.extra_conf.join("\n")
            );
            std::fs::write(data.join("postgresql.auto.conf"), conf)?;
            let log = cluster.dir.join("server.log");
            match cluster.run(
                "pg_ctl start",
                Command::new(cluster.bin.join("pg_ctl"))
                    .args(["-w", "-t", "60", "-D"])
                    .arg(&data)
                    .arg("-l")
                    .arg(&log)
                    .arg("start"),
            ) {
                Ok(()) => {
                    cluster.stopped = false;
                    return Ok(cluster);
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| ClusterError::Command {
            what: "pg_ctl start".into(),
            detail: "no attempt".into(),
        }))
    }

    fn run(&self, what: &str, cmd: &mut Command) -> Result<(), ClusterError> {
        let mut full = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"])
                    .arg(cmd.get_program())
                    .args(cmd.get_args());
                c
            }
            None => {
                let mut c = Command::new(cmd.get_program());
                c.args(cmd.get_args());
                c
            }
        };
        let out = full.current_dir(&self.dir).stdin(Stdio::null()).output()?;
        if out.status.success() {
            Ok(())
        } else {
            let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
            Err(ClusterError::Command {
                what: what.to_owned(),
                detail: format!(
                    "{}{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr),
                    log.lines().rev().take(5).collect::<Vec<_>>().join("\n")
                ),
            })
        }
    }

    /// TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A `postgres://` URL for database `db` as the superuser, TLS off.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{}?sslmode=disable",
            self.port, db
        )
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Stops the server (fast shutdown), keeping the data directory.
    pub fn stop(&mut self) -> Result<(), ClusterError> {
        if !self.stopped {
            self.run(
                "pg_ctl stop",
                Command::new(self.bin.join("pg_ctl"))
                    .args(["-w", "-m", "fast", "-D"])
                    .arg(self.data_dir())
                    .arg("stop"),
            )?;
            self.stopped = true;
        }
        Ok(())
    }

    /// Starts a stopped server again on the same port.
    pub fn restart(&mut self) -> Result<(), ClusterError> {
        self.stop()?;
        let log = self.dir.join("server.log");
        self.run(
            "pg_ctl start",
            Command::new(self.bin.join("pg_ctl"))
                .args(["-w", "-t", "60", "-D"])
                .arg(self.data_dir())
                .arg("-l")
                .arg(&log)
                .arg("start"),
        )?;
        self.stopped = false;
        Ok(())
    }

    /// Writes a file into the data directory, owned by the server's OS user with
    /// `mode` (e.g. a TLS key, which the server requires to be private).
    pub fn write_server_file(
        &self,
        name: &str,
        contents: &[u8],
        mode: u32,
    ) -> Result<(), ClusterError> {
        use std::os::unix::fs::PermissionsExt;
        let path = self.data_dir().join(name);
        std::fs::write(&path, contents)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))?;
        }
        Ok(())
    }

    /// Replaces `pg_hba.conf` with `lines` and reloads the server.
    pub fn set_hba(&self, lines: &str) -> Result<(), ClusterError> {
        std::fs::write(self.data_dir().join("pg_hba.conf"), lines)?;
        self.run(
            "pg_ctl reload",
            Command::new(self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(self.data_dir())
                .arg("reload"),
        )
    }

    /// Waits until the server accepts TCP connections (after a restart).
    pub fn wait_ready(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = self.run(
                "pg_ctl stop",
                Command::new(self.bin.join("pg_ctl"))
                    .args(["-w", "-m", "immediate", "-D"])
                    .arg(self.data_dir())
                    .arg("stop"),
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

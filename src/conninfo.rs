//! Connection strings: one parser for `postgres://` URLs, used by the replication
//! client and by sqlx alike, so that `sslmode` means the same thing on every
//! connection Tributary opens. The password never leaves this type in text form:
//! `Display` and `Debug` redact it.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgSslMode};

/// `sslmode` as libpq understands it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP only.
    Disable,
    /// Plain TCP first, TLS if the server insists (treated as `prefer` by the
    /// replication client, which never downgrades a TLS-capable server).
    Allow,
    /// TLS when the server offers it, plain TCP otherwise (libpq's default).
    Prefer,
    /// TLS, without checking the certificate.
    Require,
    /// TLS, certificate chain checked against the root CA; host name not checked.
    VerifyCa,
    /// TLS, certificate chain and host name checked.
    VerifyFull,
}

impl FromStr for SslMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "unknown sslmode `{other}`: use disable, allow, prefer, require, verify-ca or verify-full"
                ))
            }
        })
    }
}

/// The `search_path` of every session Tributary opens on a source, replication
/// or SQL. A user who can create functions in a schema on the default path
/// (`"$user", public`) could otherwise plant an overload that matches a call's
/// argument types better than the built-in (`hashtextextended(text, integer)`
/// for a literal `0`, `to_json(bigint)` for the polymorphic `to_json`) and have
/// it run as the replication role (CVE-2018-1058). Tributary names every user
/// table with its schema, so it needs nothing but `pg_catalog`; `pg_temp` is
/// put last so that it is never searched first.
pub const SOURCE_SEARCH_PATH: &str = "pg_catalog,pg_temp";

/// `channel_binding` as libpq understands it: whether a SCRAM login over TLS
/// is bound to the server's certificate (SCRAM-SHA-256-PLUS), which proves the
/// server that answered is the one that holds the password's verifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelBinding {
    /// Never bind.
    Disable,
    /// Bind when the connection uses TLS and the server offers it (default).
    Prefer,
    /// Only a bound SCRAM login is accepted.
    Require,
}

impl FromStr for ChannelBinding {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "disable" => ChannelBinding::Disable,
            "prefer" => ChannelBinding::Prefer,
            "require" => ChannelBinding::Require,
            other => {
                return Err(format!(
                    "unknown channel_binding `{other}`: use disable, prefer or require"
                ))
            }
        })
    }
}

/// A parsed `postgres://user:password@host:port/dbname?sslmode=...` URL.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnInfo {
    /// Host name or IP address (TCP only).
    pub host: String,
    /// TCP port, default 5432.
    pub port: u16,
    /// Role name, default `postgres`.
    pub user: String,
    /// Password, if any (from the URL, usually via `${VAR}`).
    pub password: Option<String>,
    /// Database name, default the user name.
    pub dbname: String,
    /// TLS policy.
    pub sslmode: SslMode,
    /// Root CA file for verify-ca / verify-full (`sslrootcert`).
    pub sslrootcert: Option<PathBuf>,
    /// `application_name` reported to the server.
    pub application_name: String,
    /// Seconds to wait for the TCP connection (`connect_timeout`, default 10).
    pub connect_timeout_s: u64,
    /// SCRAM channel binding policy (`channel_binding`, default prefer).
    pub channel_binding: ChannelBinding,
}

/// The URL could not be used as a PostgreSQL connection string.
#[derive(Debug, thiserror::Error)]
#[error("invalid connection URL: {0}")]
pub struct ConnInfoError(String);

impl FromStr for ConnInfo {
    type Err = ConnInfoError;
    fn from_str(s: &str) -> Result<Self, ConnInfoError> {
        let url = url::Url::parse(s).map_err(|e| {
            ConnInfoError(format!("{e} (expected postgres://user@host:port/dbname)"))
        })?;
        if url.scheme() != "postgres" && url.scheme() != "postgresql" {
            return Err(ConnInfoError(format!(
                "scheme `{}` is not postgres:// or postgresql://",
                url.scheme()
            )));
        }
        let decode = |v: &str| {
            percent_decode(v)
                .map_err(|()| ConnInfoError("bad percent-encoding in user or password".into()))
        };
        let user = if url.username().is_empty() {
            "postgres".to_owned()
        } else {
            decode(url.username())?
        };
        let password = url.password().map(decode).transpose()?;
        let host = url
            .host_str()
            .unwrap_or("localhost")
            .trim_matches(['[', ']'])
            .to_owned();
        let dbname = match url.path().trim_start_matches('/') {
            "" => user.clone(),
            db => decode(db)?,
        };
        let mut info = ConnInfo {
            host,
            port: url.port().unwrap_or(5432),
            user,
            password,
            dbname,
            sslmode: SslMode::Prefer,
            sslrootcert: None,
            application_name: "tributary".to_owned(),
            connect_timeout_s: 10,
            channel_binding: ChannelBinding::Prefer,
        };
        for (k, v) in url.query_pairs() {
            match k.as_ref() {
                "sslmode" => info.sslmode = v.parse().map_err(ConnInfoError)?,
                "sslrootcert" => info.sslrootcert = Some(PathBuf::from(v.as_ref())),
                "application_name" => info.application_name = v.into_owned(),
                "channel_binding" => info.channel_binding = v.parse().map_err(ConnInfoError)?,
                "connect_timeout" => {
                    info.connect_timeout_s = v
                        .parse()
                        .map_err(|_| ConnInfoError(format!("connect_timeout `{v}` is not a number of seconds")))?
                }
                other => {
                    return Err(ConnInfoError(format!(
                        "unsupported parameter `{other}` (supported: sslmode, sslrootcert, channel_binding, application_name, connect_timeout)"
                    )))
                }
            }
        }
        if info.channel_binding == ChannelBinding::Require && info.sslmode != SslMode::VerifyFull {
            // The SQL connections (sqlx) cannot bind SCRAM to the channel; with
            // verify-full they prove the server by its certificate instead, so
            // both paths trust the same server.
            return Err(ConnInfoError(
                "channel_binding=require needs sslmode=verify-full (with sslrootcert): Tributary's SQL \
                 connections prove the server by its certificate, its replication connection by channel binding too"
                    .into(),
            ));
        }
        Ok(info)
    }
}

fn percent_decode(s: &str) -> Result<String, ()> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or(())?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| ())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ())
}

impl ConnInfo {
    /// sqlx options for an ordinary (non-replication) connection with the same
    /// host, credentials and TLS policy.
    ///
    /// The TLS policy is the replication client's (`pgwire`): `require` with
    /// `sslrootcert` checks the chain (as libpq does when a root certificate
    /// is given), and with a password `allow` and `prefer` need TLS, because
    /// sqlx would answer a server that asks for the password in clear or as
    /// MD5 over a plain connection, and the replication client refuses that
    /// unless `sslmode=disable` was chosen explicitly.
    pub fn pg_options(&self) -> PgConnectOptions {
        let mut o = PgConnectOptions::new()
            .host(&self.host)
            .port(self.port)
            .username(&self.user)
            .database(&self.dbname)
            .application_name(&self.application_name)
            .ssl_mode(self.sqlx_ssl_mode());
        if let Some(p) = &self.password {
            o = o.password(p);
        }
        if let Some(ca) = &self.sslrootcert {
            o = o.ssl_root_cert(ca);
        }
        o
    }

    /// [`ConnInfo::pg_options`] for a session on a source: names resolve in
    /// [`SOURCE_SEARCH_PATH`] only, so that no function or operator a database
    /// user planted in a schema of the default path is ever called by the
    /// replication role (see `SOURCE_SEARCH_PATH`).
    pub fn source_options(&self) -> PgConnectOptions {
        self.pg_options()
            .options([("search_path", SOURCE_SEARCH_PATH)])
    }

    /// The sqlx TLS mode that gives the SQL connections the replication
    /// client's policy (see [`ConnInfo::pg_options`]).
    pub fn sqlx_ssl_mode(&self) -> PgSslMode {
        match self.sslmode {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Allow | SslMode::Prefer if self.password.is_some() => PgSslMode::Require,
            SslMode::Allow => PgSslMode::Allow,
            SslMode::Prefer => PgSslMode::Prefer,
            SslMode::Require if self.sslrootcert.is_some() => PgSslMode::VerifyCa,
            SslMode::Require => PgSslMode::Require,
            SslMode::VerifyCa => PgSslMode::VerifyCa,
            SslMode::VerifyFull => PgSslMode::VerifyFull,
        }
    }

    /// The same server and role, another database (used by `check` and `demo`).
    pub fn with_dbname(&self, dbname: &str) -> ConnInfo {
        ConnInfo {
            dbname: dbname.to_owned(),
            ..self.clone()
        }
    }
}

/// Redacted: `postgres://user:***@host:port/db?sslmode=...`.
impl fmt::Display for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pw = if self.password.is_some() { ":***" } else { "" };
        write!(
            f,
            "postgres://{}{}@{}:{}/{}?sslmode={:?}",
            self.user, pw, self.host, self.port, self.dbname, self.sslmode
        )
    }
}

impl fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_url_with_defaults_and_params() {
        let c: ConnInfo =
            "postgres://rep:s%40cret@db.example:6543/crm?sslmode=verify-full&sslrootcert=/ca.pem"
                .parse()
                .unwrap();
        assert_eq!(c.host, "db.example");
        assert_eq!(c.port, 6543);
        assert_eq!(c.user, "rep");
        assert_eq!(c.password.as_deref(), Some("s@cret"));
        assert_eq!(c.dbname, "crm");
        assert_eq!(c.sslmode, SslMode::VerifyFull);
        assert_eq!(c.sslrootcert, Some(PathBuf::from("/ca.pem")));

        let d: ConnInfo = "postgres://127.0.0.1".parse().unwrap();
        assert_eq!(
            (d.port, d.user.as_str(), d.dbname.as_str(), d.sslmode),
            (5432, "postgres", "postgres", SslMode::Prefer)
        );
    }

    #[test]
    fn display_and_debug_never_show_the_password() {
        let c: ConnInfo = "postgres://rep:hunter2@h/db".parse().unwrap();
        assert!(!c.to_string().contains("hunter2"));
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(c.to_string().contains(":***@"));
    }

    /// Both paths read the same settings: the SQL connections' TLS mode
    /// follows the replication client's policy.
    #[test]
    fn sql_connections_get_the_replication_clients_tls_policy() {
        let mode = |url: &str| url.parse::<ConnInfo>().unwrap().sqlx_ssl_mode();
        assert!(matches!(mode("postgres://u:pw@h/db"), PgSslMode::Require));
        assert!(matches!(
            mode("postgres://u:pw@h/db?sslmode=allow"),
            PgSslMode::Require
        ));
        assert!(matches!(mode("postgres://u@h/db"), PgSslMode::Prefer));
        assert!(matches!(
            mode("postgres://u:pw@h/db?sslmode=disable"),
            PgSslMode::Disable
        ));
        assert!(matches!(
            mode("postgres://u@h/db?sslmode=require&sslrootcert=/ca.pem"),
            PgSslMode::VerifyCa
        ));
        assert!(matches!(
            mode("postgres://u@h/db?sslmode=require"),
            PgSslMode::Require
        ));
        let e = "postgres://h/db?sslmode=require&channel_binding=require"
            .parse::<ConnInfo>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("verify-full"), "{e}");
        let c: ConnInfo = "postgres://h/db?sslmode=verify-full&channel_binding=require"
            .parse()
            .unwrap();
        assert_eq!(c.channel_binding, ChannelBinding::Require);
    }

    #[test]
    fn rejects_bad_sslmode_and_unknown_params() {
        let e = "postgres://h/db?sslmode=always"
            .parse::<ConnInfo>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("verify-full"), "{e}");
        let e = "postgres://h/db?foo=1"
            .parse::<ConnInfo>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("`foo`"), "{e}");
        assert!("mysql://h/db".parse::<ConnInfo>().is_err());
    }
}

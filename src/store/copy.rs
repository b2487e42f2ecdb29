//! Rows for `COPY … FROM STDIN` in PostgreSQL's text format: the apply path
//! writes rows it knows to be new this way (no `ON CONFLICT` probe, no
//! array parameters to unpack).

use sqlx::PgConnection;

use super::StoreError;

/// A buffer of rows in `COPY` text format.
#[derive(Default)]
pub(crate) struct CopyRows {
    buf: Vec<u8>,
    first: bool,
    rows: usize,
}

impl CopyRows {
    pub(crate) fn new() -> CopyRows {
        CopyRows {
            buf: Vec::with_capacity(1 << 16),
            first: true,
            rows: 0,
        }
    }

    fn sep(&mut self) {
        if !self.first {
            self.buf.push(b'\t');
        }
        self.first = false;
    }

    /// A text value, escaped.
    pub(crate) fn text(&mut self, s: &str) -> &mut Self {
        self.sep();
        for &b in s.as_bytes() {
            match b {
                b'\\' => self.buf.extend_from_slice(b"\\\\"),
                b'\t' => self.buf.extend_from_slice(b"\\t"),
                b'\n' => self.buf.extend_from_slice(b"\\n"),
                b'\r' => self.buf.extend_from_slice(b"\\r"),
                _ => self.buf.push(b),
            }
        }
        self
    }

    /// NULL.
    pub(crate) fn null(&mut self) -> &mut Self {
        self.sep();
        self.buf.extend_from_slice(b"\\N");
        self
    }

    /// A number, a boolean or anything whose `Display` needs no escaping.
    pub(crate) fn plain(&mut self, v: impl std::fmt::Display) -> &mut Self {
        use std::io::Write;
        self.sep();
        let _ = write!(self.buf, "{v}");
        self
    }

    pub(crate) fn opt(&mut self, v: Option<impl std::fmt::Display>) -> &mut Self {
        match v {
            Some(v) => self.plain(v),
            None => self.null(),
        }
    }

    pub(crate) fn bool(&mut self, b: bool) -> &mut Self {
        self.plain(if b { 't' } else { 'f' })
    }

    /// A timestamp, to the microsecond (truncated, as sqlx binds one).
    pub(crate) fn time(&mut self, t: chrono::DateTime<chrono::Utc>) -> &mut Self {
        let t = chrono::SubsecRound::trunc_subsecs(t, 6);
        self.plain(t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
    }

    pub(crate) fn end_row(&mut self) {
        self.buf.push(b'\n');
        self.first = true;
        self.rows += 1;
    }

    /// Sends the rows with `statement` (`copy t (cols) from stdin`).
    pub(crate) async fn send(
        self,
        conn: &mut PgConnection,
        statement: &str,
    ) -> Result<(), StoreError> {
        if self.rows == 0 {
            return Ok(());
        }
        let mut copy = conn.copy_in_raw(statement).await?;
        copy.send(self.buf).await?;
        copy.finish().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_values_are_escaped_and_nulls_marked() {
        let mut c = CopyRows::new();
        c.text("a\tb\\c\nd").null().plain(42).bool(true);
        c.end_row();
        assert_eq!(
            String::from_utf8(c.buf).unwrap(),
            "a\\tb\\\\c\\nd\t\\N\t42\tt\n"
        );
    }
}

//! Takes the parameters the relay implements itself (`sslmode`, `sslrootcert`,
//! `sslnegotiation`, `target_session_attrs`) out of a libpq connection string,
//! URL or key=value form, and returns the rest unchanged for
//! `tokio_postgres::Config`, whose parser knows neither `verify-ca`/`verify-full`,
//! `sslrootcert` nor `target_session_attrs=primary`. Pure: no I/O.
//!
//! Error messages never contain the connection string (it may hold a password).

/// The parameters found in a connection string that the relay implements
/// itself (the last one wins, like libpq).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LibpqParams {
    pub sslmode: Option<String>,
    pub sslrootcert: Option<String>,
    pub sslnegotiation: Option<String>,
    pub target_session_attrs: Option<String>,
}

/// Parameters libpq knows that this relay does not implement.
const UNSUPPORTED: &[&str] = &["sslcert", "sslkey", "sslpassword", "sslcrl", "sslcrldir"];

/// Splits `conninfo` into the connection string without the relay's own
/// parameters and those parameters.
pub fn split_params(conninfo: &str) -> Result<(String, LibpqParams), String> {
    let mut params = LibpqParams::default();
    let mut take = |key: &str, value: String| -> Result<bool, String> {
        let slot = match key {
            "sslmode" => &mut params.sslmode,
            "sslrootcert" => &mut params.sslrootcert,
            "sslnegotiation" => &mut params.sslnegotiation,
            "target_session_attrs" => &mut params.target_session_attrs,
            k if UNSUPPORTED.contains(&k) => {
                return Err(format!(
                    "{k} is not supported (no client certificates or CRLs); remove it and authenticate with a password"
                ))
            }
            _ => return Ok(false),
        };
        *slot = Some(value);
        Ok(true)
    };
    let rest = if conninfo.starts_with("postgres://") || conninfo.starts_with("postgresql://") {
        split_url(conninfo, &mut take)?
    } else {
        split_key_values(conninfo, &mut take)?
    };
    Ok((rest, params))
}

/// URL form: parameters live in the query string, `key=value` joined by `&`, percent-encoded.
fn split_url(
    url: &str,
    take: &mut impl FnMut(&str, String) -> Result<bool, String>,
) -> Result<String, String> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok(url.to_string());
    };
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if !take(&percent_decode(k)?, percent_decode(v)?)? {
            kept.push(pair);
        }
    }
    Ok(if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    })
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bad = || "a query parameter has an invalid %-escape".to_string();
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or_else(bad)?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "a query parameter is not UTF-8".to_string())
}

/// key=value form: `key = value` pairs separated by whitespace; a value is bare
/// (up to whitespace) or single-quoted; `\` escapes the next character in both.
fn split_key_values(
    conninfo: &str,
    take: &mut impl FnMut(&str, String) -> Result<bool, String>,
) -> Result<String, String> {
    let s = conninfo.as_bytes();
    let mut kept = String::new();
    let mut i = 0;
    let skip_ws = |mut i: usize| {
        while i < s.len() && s[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    loop {
        i = skip_ws(i);
        if i >= s.len() {
            break;
        }
        let start = i;
        while i < s.len() && s[i] != b'=' && !s[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = &conninfo[start..i];
        i = skip_ws(i);
        if i >= s.len() || s[i] != b'=' {
            // Not a key=value pair: leave it for tokio-postgres to reject.
            return Ok(conninfo.to_string());
        }
        i = skip_ws(i + 1);
        let mut value = Vec::new();
        if i < s.len() && s[i] == b'\'' {
            i += 1;
            loop {
                match s.get(i) {
                    None => return Err(format!("the value of {key} lacks its closing quote")),
                    Some(b'\'') => break,
                    Some(b'\\') if i + 1 < s.len() => {
                        value.push(s[i + 1]);
                        i += 1;
                    }
                    Some(&c) => value.push(c),
                }
                i += 1;
            }
            i += 1;
        } else {
            while i < s.len() && !s[i].is_ascii_whitespace() {
                if s[i] == b'\\' && i + 1 < s.len() {
                    i += 1;
                }
                value.push(s[i]);
                i += 1;
            }
        }
        let value = String::from_utf8(value).map_err(|_| format!("{key} is not UTF-8"))?;
        if !take(key, value)? {
            if !kept.is_empty() {
                kept.push(' ');
            }
            kept.push_str(&conninfo[start..i]);
        }
    }
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(s: &str) -> (String, LibpqParams) {
        split_params(s).unwrap()
    }

    #[test]
    fn url_parameters_are_taken_out_and_the_rest_kept() {
        let (rest, p) = split(
            "postgresql://u:pw@h:5432/db?sslmode=verify-full&connect_timeout=5&sslrootcert=%2Fetc%2Fca%20x.pem",
        );
        assert_eq!(rest, "postgresql://u:pw@h:5432/db?connect_timeout=5");
        assert_eq!(p.sslmode.as_deref(), Some("verify-full"));
        assert_eq!(p.sslrootcert.as_deref(), Some("/etc/ca x.pem"));
        let (rest, p) = split("postgres://h/db?sslmode=require");
        assert_eq!(rest, "postgres://h/db");
        assert_eq!(p.sslmode.as_deref(), Some("require"));
        assert_eq!(split("postgres://h/db").1, LibpqParams::default());
    }

    #[test]
    fn key_value_parameters_are_taken_out_and_the_rest_kept() {
        let (rest, p) = split(
            "host=db user=relay password='a \\' b' sslmode = verify-ca sslrootcert='/etc/my ca.pem' dbname=app",
        );
        assert_eq!(rest, "host=db user=relay password='a \\' b' dbname=app");
        assert_eq!(p.sslmode.as_deref(), Some("verify-ca"));
        assert_eq!(p.sslrootcert.as_deref(), Some("/etc/my ca.pem"));
        let (rest, p) = split("host=/run/postgresql sslmode=disable");
        assert_eq!(rest, "host=/run/postgresql");
        assert_eq!(p.sslmode.as_deref(), Some("disable"));
        let (rest, p) = split("host=a,b port=5432,5433 target_session_attrs=primary dbname=app");
        assert_eq!(rest, "host=a,b port=5432,5433 dbname=app");
        assert_eq!(p.target_session_attrs.as_deref(), Some("primary"));
        let (rest, p) = split("postgresql://u@a:1,b:2/db?target_session_attrs=read-write");
        assert_eq!(rest, "postgresql://u@a:1,b:2/db");
        assert_eq!(p.target_session_attrs.as_deref(), Some("read-write"));
    }

    #[test]
    fn unsupported_and_malformed_parameters_are_refused_without_the_secret() {
        for s in [
            "postgresql://u:s3cret@h/db?sslcert=/c.pem",
            "host=h password=s3cret sslkey=/k.pem",
            "postgresql://u:s3cret@h/db?sslrootcert=%zz",
            "host=h password=s3cret sslrootcert='/unclosed",
        ] {
            let err = split_params(s).unwrap_err();
            assert!(!err.contains("s3cret"), "{err}");
        }
        assert!(split_params("host=h sslcert=x")
            .unwrap_err()
            .contains("sslcert is not supported"));
    }
}

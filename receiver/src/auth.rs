//! Caller identity (from the client certificate) and optional bearer tokens (`tokens_file`).

use std::collections::HashMap;
use std::path::Path;

/// `host_id → token`, from lines `host_id token` (`#` comments and blank lines ignored).
#[derive(Debug, Clone, Default)]
pub struct Tokens(HashMap<String, String>);

impl Tokens {
    pub fn parse(text: &str) -> Result<Tokens, String> {
        let mut map = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(host), Some(token), None) => {
                    cis490_common::validate_id(host)
                        .map_err(|e| format!("line {}: host_id {host:?}: {e}", n + 1))?;
                    map.insert(host.to_string(), token.to_string());
                }
                _ => return Err(format!("line {}: expected `host_id token`", n + 1)),
            }
        }
        Ok(Tokens(map))
    }

    pub fn load(path: &Path) -> Result<Tokens, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
        Self::parse(&text)
    }

    /// Checks an `Authorization` header value for `host_id`.
    pub fn verify(&self, host_id: &str, authorization: Option<&str>) -> Result<(), &'static str> {
        let Some(want) = self.0.get(host_id) else {
            return Err("no token is configured for this host on the receiver");
        };
        let Some(given) = authorization.and_then(|v| v.strip_prefix("Bearer ")) else {
            return Err("an Authorization: Bearer token is required");
        };
        if constant_time_eq(want.as_bytes(), given.trim().as_bytes()) {
            Ok(())
        } else {
            Err("the bearer token does not match this host's token")
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_verifies() {
        let t = Tokens::parse("# fleet\nlab-01 s3cret\n\nlab-02 other\n").unwrap();
        assert_eq!(t.verify("lab-01", Some("Bearer s3cret")), Ok(()));
        assert!(t.verify("lab-01", Some("Bearer other")).is_err());
        assert!(t.verify("lab-01", None).is_err());
        assert!(t.verify("lab-03", Some("Bearer s3cret")).is_err());
        assert!(Tokens::parse("lab-01").unwrap_err().contains("line 1"));
        assert!(Tokens::parse("../x tok").unwrap_err().contains("host_id"));
    }
}

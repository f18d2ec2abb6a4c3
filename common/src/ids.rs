//! Host and episode identifiers, commits and SHA-256 digests as the wire protocol spells them.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("id is empty")]
    Empty,
    #[error("id is longer than 128 characters")]
    TooLong,
    #[error("id must start with a letter or digit")]
    BadStart,
    #[error("id contains {0:?}; only letters, digits, '.', '_' and '-' are allowed")]
    BadChar(char),
    #[error("id contains '..'")]
    DotDot,
}

/// Checks `^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$` without `..` (SPEC §1).
pub fn validate_id(id: &str) -> Result<(), IdError> {
    let first = id.chars().next().ok_or(IdError::Empty)?;
    if id.len() > 128 {
        return Err(IdError::TooLong);
    }
    if !first.is_ascii_alphanumeric() {
        return Err(IdError::BadStart);
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(IdError::BadChar(c));
    }
    if id.contains("..") {
        return Err(IdError::DotDot);
    }
    Ok(())
}

/// A git commit id: 40 hex digits, stored lowercase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Commit([u8; 20]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommitError {
    #[error("commit is {0} characters long, expected 40 hex digits")]
    Length(usize),
    #[error("commit contains a character that is not a hex digit")]
    NotHex,
}

impl Commit {
    /// Parses exactly 40 hex digits; uppercase is accepted and lowered.
    pub fn parse(s: &str) -> Result<Self, CommitError> {
        if s.len() != 40 {
            return Err(CommitError::Length(s.chars().count()));
        }
        let mut out = [0u8; 20];
        hex::decode_to_slice(s, &mut out).map_err(|_| CommitError::NotHex)?;
        Ok(Commit(out))
    }

    pub fn from_bytes(bytes: [u8; 20]) -> Self {
        Commit(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 20] {
        &self.0
    }
}

impl fmt::Display for Commit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl serde::Serialize for Commit {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Commit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Commit::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Parses a SHA-256 written as 64 hex digits (either case) into its lowercase form.
pub fn parse_sha256(s: &str) -> Option<String> {
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some(s.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_spec_pattern() {
        for ok in ["a", "labhost-01", "ep_2026.11.23-1", &"x".repeat(128)] {
            assert_eq!(validate_id(ok), Ok(()), "{ok}");
        }
        assert_eq!(validate_id(""), Err(IdError::Empty));
        assert_eq!(validate_id(&"x".repeat(129)), Err(IdError::TooLong));
        assert_eq!(validate_id(".hidden"), Err(IdError::BadStart));
        assert_eq!(validate_id("-x"), Err(IdError::BadStart));
        assert_eq!(validate_id("a/b"), Err(IdError::BadChar('/')));
        assert_eq!(validate_id("a b"), Err(IdError::BadChar(' ')));
        assert_eq!(validate_id("é"), Err(IdError::BadStart));
        assert_eq!(validate_id("a..b"), Err(IdError::DotDot));
    }

    #[test]
    fn commits_are_40_hex_and_lowered() {
        let upper = "ABCDEF0123456789ABCDEF0123456789ABCDEF01";
        let c = Commit::parse(upper).unwrap();
        assert_eq!(c.to_string(), upper.to_ascii_lowercase());
        assert_eq!(Commit::parse(&upper[..39]), Err(CommitError::Length(39)));
        assert_eq!(
            Commit::parse(&format!("{upper}0")),
            Err(CommitError::Length(41))
        );
        assert_eq!(
            Commit::parse("g".repeat(40).as_str()),
            Err(CommitError::NotHex)
        );
    }

    #[test]
    fn sha256_needs_64_hex() {
        assert_eq!(parse_sha256(&"A".repeat(64)), Some("a".repeat(64)));
        assert_eq!(parse_sha256(&"a".repeat(63)), None);
        assert_eq!(parse_sha256(&"z".repeat(64)), None);
    }
}

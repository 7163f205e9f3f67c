//! Topic names and the patterns that allow-lists are written in.

use thiserror::Error;

/// Why a topic name was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TopicError {
    /// The name is empty.
    #[error("topic name is empty")]
    Empty,
    /// The name is longer than the configured maximum.
    #[error("topic name is {len} bytes, the limit is {max}")]
    TooLong {
        /// The length of the refused name.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The name has a character outside `A-Z a-z 0-9 _ - . : /`.
    #[error("topic name has a character outside [A-Za-z0-9_.:/-]: {0:?}")]
    BadCharacter(char),
}

/// Checks a topic name: non-empty, at most `max_len` bytes, characters from
/// `[A-Za-z0-9_.:/-]` only, so names are safe in metrics, logs, Redis keys and URLs.
pub fn validate_topic(name: &str, max_len: usize) -> Result<(), TopicError> {
    if name.is_empty() {
        return Err(TopicError::Empty);
    }
    if name.len() > max_len {
        return Err(TopicError::TooLong {
            len: name.len(),
            max: max_len,
        });
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '/')))
    {
        Some(bad) => Err(TopicError::BadCharacter(bad)),
        None => Ok(()),
    }
}

/// A topic pattern: an exact name, `*` for every topic, or a prefix ending in `*`
/// (`chat.*` matches `chat.room1` and `chat.a.b`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPattern(String);

impl TopicPattern {
    /// Checks a pattern: `*`, or a valid topic name, optionally ending in `*`.
    pub fn parse(pattern: &str, max_len: usize) -> Result<Self, TopicError> {
        let name = pattern.strip_suffix('*').unwrap_or(pattern);
        if !name.is_empty() {
            validate_topic(name, max_len)?;
        }
        Ok(TopicPattern(pattern.to_owned()))
    }

    /// Wraps a pattern string.
    pub fn new(pattern: impl Into<String>) -> Self {
        TopicPattern(pattern.into())
    }

    /// Whether `topic` matches this pattern.
    pub fn matches(&self, topic: &str) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => topic.starts_with(prefix),
            None => self.0 == topic,
        }
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names() {
        assert_eq!(validate_topic("chat.room-1/a:b_c", 64), Ok(()));
        assert_eq!(validate_topic("", 64), Err(TopicError::Empty));
        assert_eq!(
            validate_topic("abcdef", 5),
            Err(TopicError::TooLong { len: 6, max: 5 })
        );
        assert_eq!(
            validate_topic("a b", 64),
            Err(TopicError::BadCharacter(' '))
        );
        assert_eq!(
            validate_topic("ünïcode", 64),
            Err(TopicError::BadCharacter('ü'))
        );
    }

    #[test]
    fn patterns() {
        let table = [
            ("*", "anything", true),
            ("chat.*", "chat.room1", true),
            ("chat.*", "chat.", true),
            ("chat.*", "chatroom", false),
            ("news", "news", true),
            ("news", "news2", false),
        ];
        assert!(TopicPattern::parse("chat.*", 64).is_ok());
        assert!(TopicPattern::parse("*", 64).is_ok());
        assert!(TopicPattern::parse("a b*", 64).is_err());
        assert!(TopicPattern::parse("a**", 64).is_err());
        for (pattern, topic, expected) in table {
            assert_eq!(
                TopicPattern::new(pattern).matches(topic),
                expected,
                "{pattern} vs {topic}"
            );
        }
    }
}

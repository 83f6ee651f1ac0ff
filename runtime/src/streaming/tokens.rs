//! Single-use tokens: Exec, Attach and PortForward each store what they
//! were asked under a random token and return a URL naming it; the first
//! request to that URL takes it. A token is refused when unknown, already
//! used, or older than its time to live.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Tokens waiting at once at most; more means a client that asks for URLs
/// and never uses them.
pub const MAX_PENDING: usize = 4096;

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("unknown or already used token")]
    Unknown,
    #[error("expired token")]
    Expired,
    #[error("too many pending streaming requests")]
    Full,
}

/// Pending requests by token.
#[derive(Debug)]
pub struct Tokens<T> {
    ttl: Duration,
    pending: std::sync::Mutex<HashMap<String, (Instant, T)>>,
}

impl<T> Tokens<T> {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            pending: Default::default(),
        }
    }

    /// Stores `value` under a new token (32 random bytes, hex).
    pub fn issue(&self, value: T) -> Result<String, TokenError> {
        self.issue_at(value, Instant::now())
    }

    fn issue_at(&self, value: T, now: Instant) -> Result<String, TokenError> {
        let token = crate::sandbox::new_id().map_err(|_| TokenError::Full)?;
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.len() >= MAX_PENDING {
            // Expired ones are dropped first; a fresh one would still answer
            // `Expired` until then.
            let ttl = self.ttl;
            pending.retain(|_, (at, _)| now.saturating_duration_since(*at) <= ttl);
            if pending.len() >= MAX_PENDING {
                return Err(TokenError::Full);
            }
        }
        pending.insert(token.clone(), (now, value));
        Ok(token)
    }

    /// Takes the value of `token`: it cannot be used again.
    pub fn take(&self, token: &str) -> Result<T, TokenError> {
        self.take_at(token, Instant::now())
    }

    fn take_at(&self, token: &str, now: Instant) -> Result<T, TokenError> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let (at, value) = pending.remove(token).ok_or(TokenError::Unknown)?;
        if now.saturating_duration_since(at) > self.ttl {
            return Err(TokenError::Expired);
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_taken_once() {
        let tokens = Tokens::new(Duration::from_secs(60));
        let t = tokens.issue(7).unwrap();
        assert_eq!(t.len(), 64);
        assert!(t.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(tokens.take(&t), Ok(7));
        assert_eq!(tokens.take(&t), Err(TokenError::Unknown));
    }

    #[test]
    fn unknown_and_expired_tokens_are_refused() {
        let tokens = Tokens::new(Duration::from_secs(60));
        assert_eq!(tokens.take("nope"), Err(TokenError::Unknown));
        assert_eq!(tokens.take(""), Err(TokenError::Unknown));
        let start = Instant::now();
        let t = tokens.issue_at(1, start).unwrap();
        assert_eq!(
            tokens.take_at(&t, start + Duration::from_secs(61)),
            Err(TokenError::Expired)
        );
        // An expired token is gone too.
        assert_eq!(tokens.take_at(&t, start), Err(TokenError::Unknown));
        let t = tokens.issue_at(2, start).unwrap();
        assert_eq!(tokens.take_at(&t, start + Duration::from_secs(60)), Ok(2));
    }

    #[test]
    fn tokens_differ_and_pending_ones_are_bounded() {
        let tokens = Tokens::new(Duration::from_secs(1));
        let start = Instant::now();
        let mut seen = std::collections::HashSet::new();
        for i in 0..MAX_PENDING {
            assert!(seen.insert(tokens.issue_at(i, start).unwrap()));
        }
        assert_eq!(tokens.issue_at(0, start), Err(TokenError::Full));
        // Once they expired, they make room.
        assert!(tokens.issue_at(0, start + Duration::from_secs(2)).is_ok());
    }
}

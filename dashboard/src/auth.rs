//! Who may see the pages and who may act.
//!
//! With --token, every request needs `Authorization: Bearer <token>` or the session cookie
//! that the login form sets (random, HttpOnly, SameSite=Strict, kept in memory only).
//! Every POST, logged in or not, must carry the CSRF token that this process printed into
//! its own forms: another site can make a browser send a form here, but cannot read a page
//! of ours to learn the token. Without --token (loopback only) the Host header must name a
//! loopback host too, so a DNS-rebound name cannot read the pages from another origin.

use std::collections::HashSet;
use std::sync::Mutex;

pub struct Auth {
    token: Option<String>,
    /// For actions: printed only into pages that passed authentication.
    pub csrf: String,
    /// For the login form, which anyone who reaches the port can load: a different value,
    /// so that learning it tells nothing about the one actions need.
    pub login_csrf: String,
    sessions: Mutex<HashSet<String>>,
}

pub const COOKIE: &str = "queue_ext_session";

pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    // The OS random source; without it there is no safe token to hand out.
    getrandom::fill(&mut buf).expect("the operating system's random source is unavailable");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares without stopping at the first difference, so timing does not reveal a prefix.
pub fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Auth {
    pub fn new(token: Option<String>) -> Auth {
        Auth {
            token,
            csrf: random_hex(32),
            login_csrf: random_hex(32),
            sessions: Mutex::new(HashSet::new()),
        }
    }

    pub fn required(&self) -> bool {
        self.token.is_some()
    }

    pub fn token_ok(&self, given: &str) -> bool {
        self.token.as_deref().is_some_and(|t| same(t, given))
    }

    pub fn new_session(&self) -> String {
        let id = random_hex(32);
        if let Ok(mut s) = self.sessions.lock() {
            s.insert(id.clone());
        }
        id
    }

    pub fn end_session(&self, id: &str) {
        if let Ok(mut s) = self.sessions.lock() {
            s.remove(id);
        }
    }

    fn session_ok(&self, id: &str) -> bool {
        self.sessions
            .lock()
            .map(|s| s.iter().any(|known| same(known, id)))
            .unwrap_or(false)
    }

    /// Whether the request's headers authenticate it (always true without --token).
    pub fn allows(&self, headers: &axum::http::HeaderMap) -> bool {
        if !self.required() {
            return true;
        }
        if let Some(v) = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
        {
            if let Some(t) = v.strip_prefix("Bearer ") {
                return self.token_ok(t.trim());
            }
        }
        cookie(headers, COOKIE).is_some_and(|id| self.session_ok(&id))
    }

    pub fn csrf_ok(&self, given: Option<&str>) -> bool {
        given.is_some_and(|g| same(&self.csrf, g))
    }
}

pub fn cookie(headers: &axum::http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// A Host header naming this machine: localhost, 127.0.0.0/8 or ::1, with any port.
pub fn loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host)
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        assert!(loopback_host("127.0.0.1:8080"));
        assert!(loopback_host("localhost"));
        assert!(loopback_host("[::1]:80"));
        assert!(!loopback_host("evil.example:8080"));
        assert!(!loopback_host("127.0.0.1.evil.example"));
    }

    #[test]
    fn compare() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "ab"));
    }
}

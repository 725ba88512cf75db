//! Preview links: a browser cannot send the API's bearer token, so a
//! caller that holds it asks for a short-lived link to one thread's port
//! (`POST /v1/previews`), and the link itself is the credential
//! (`ANY /v1/previews/{link}/{path}`). A link is `PAYLOAD.MAC`: the thread,
//! the port and the expiry, signed with HMAC-SHA256 under a key this server
//! process drew at start (links die with it). Relative URLs of the page
//! stay under the link's prefix.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The longest a link lives, and its default.
pub const MAX_LINK_SECS: u64 = 24 * 3600;
pub const DEFAULT_LINK_SECS: u64 = 3600;

/// The key links are signed with: 32 bytes from the kernel.
pub struct LinkKey([u8; 32]);

/// What a valid link grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub thread_id: String,
    pub port: u16,
    pub expires_at: u64,
}

impl LinkKey {
    /// A fresh key (`/dev/urandom`).
    pub fn new() -> std::io::Result<Self> {
        use std::io::Read;
        let mut key = [0u8; 32];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut key)?;
        Ok(LinkKey(key))
    }

    fn mac(&self, payload: &str) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("any key length");
        mac.update(payload.as_bytes());
        mac
    }

    /// The link granting `grant`.
    pub fn sign(&self, grant: &Grant) -> String {
        let payload = URL_SAFE_NO_PAD.encode(format!(
            "{}|{}|{}",
            grant.thread_id, grant.port, grant.expires_at
        ));
        let tag = URL_SAFE_NO_PAD.encode(self.mac(&payload).finalize().into_bytes());
        format!("{payload}.{tag}")
    }

    /// What `link` grants, if this key signed it and it has not expired at
    /// `now` (Unix seconds). The MAC is checked in constant time, before
    /// anything of the payload is read.
    pub fn verify(&self, link: &str, now: u64) -> Option<Grant> {
        let (payload, tag) = link.split_once('.')?;
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        self.mac(payload).verify_slice(&tag).ok()?;
        let text = String::from_utf8(URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
        let mut fields = text.split('|');
        let grant = Grant {
            thread_id: fields.next()?.to_owned(),
            port: fields.next()?.parse().ok()?,
            expires_at: fields.next()?.parse().ok()?,
        };
        (fields.next().is_none() && now < grant.expires_at).then_some(grant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_grants_its_thread_and_port_until_it_expires_and_nothing_forged() {
        let key = LinkKey::new().unwrap();
        let grant = Grant {
            thread_id: "alice-1".into(),
            port: 8080,
            expires_at: 1_000,
        };
        let link = key.sign(&grant);
        assert!(link
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)));
        assert_eq!(key.verify(&link, 999), Some(grant.clone()));
        assert_eq!(key.verify(&link, 1_000), None, "expired");
        // Another server's key, a changed payload, a changed tag: refused.
        assert_eq!(LinkKey::new().unwrap().verify(&link, 0), None);
        let (payload, tag) = link.split_once('.').unwrap();
        let bob = URL_SAFE_NO_PAD.encode("bob-1|8080|1000");
        assert_eq!(key.verify(&format!("{bob}.{tag}"), 0), None);
        let mut forged = tag.as_bytes().to_vec();
        forged[0] = if forged[0] == b'A' { b'B' } else { b'A' };
        let forged = format!("{payload}.{}", String::from_utf8(forged).unwrap());
        assert_eq!(key.verify(&forged, 0), None);
        for junk in ["", ".", "x.y", "a.b.c", &"x".repeat(10_000)] {
            assert_eq!(key.verify(junk, 0), None, "{junk:.20}");
        }
    }
}

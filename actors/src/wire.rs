//! The wire format of every message that crosses nodes: serde + bincode 2 inside an envelope that
//! carries the protocol version.
//!
//! ractor_cluster's `BytesConvertable::from_bytes` cannot return an error, so a payload that does
//! not decode (another protocol version, garbage, a truncated frame) becomes [`Wire::Bad`] instead of
//! a panic: the receiving actor logs it, [`bad_messages`] counts it, and nothing else happens.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Bumped on any incompatible change to a message that crosses nodes.
pub const PROTOCOL_VERSION: u32 = 2;

/// Largest payload we agree to decode (ractor_cluster's own frame limit is 16 MiB).
const DECODE_LIMIT: usize = 16 << 20;

static BAD_MESSAGES: AtomicU64 = AtomicU64::new(0);

/// Messages from peers that could not be decoded since this process started.
pub fn bad_messages() -> u64 {
    BAD_MESSAGES.load(Ordering::Relaxed)
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<DECODE_LIMIT>()
}

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    version: u32,
    body: Result<T, String>,
}

/// A value as received from the network: decoded, or the reason it could not be.
#[derive(Debug, Clone, PartialEq)]
pub enum Wire<T> {
    Ok(T),
    Bad(String),
}

impl<T> Wire<T> {
    /// The value, or the decode failure as an error message.
    pub fn into_result(self) -> Result<T, String> {
        match self {
            Wire::Ok(v) => Ok(v),
            Wire::Bad(e) => Err(e),
        }
    }
}

impl<T> From<T> for Wire<T> {
    fn from(v: T) -> Self {
        Wire::Ok(v)
    }
}

/// Encodes `value` in the versioned envelope.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    #[derive(Serialize)]
    struct Out<'a, T> {
        version: u32,
        body: Result<&'a T, &'a str>,
    }
    bincode::serde::encode_to_vec(Out { version: PROTOCOL_VERSION, body: Ok(value) }, config()).expect("bincode encodes every serde value we define")
}

/// Decodes an envelope; a wrong version, trailing bytes or garbage is an error naming the cause.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let (version, _): (u32, usize) =
        bincode::serde::decode_from_slice(bytes, config()).map_err(|e| format!("no protocol version header ({} bytes): {e}", bytes.len()))?;
    if version != PROTOCOL_VERSION {
        return Err(format!("protocol version {version}, this node speaks {PROTOCOL_VERSION}"));
    }
    let (env, used): (Envelope<T>, usize) =
        bincode::serde::decode_from_slice(bytes, config()).map_err(|e| format!("undecodable {}: {e}", std::any::type_name::<T>()))?;
    if used != bytes.len() {
        return Err(format!("{} trailing bytes after {}", bytes.len() - used, std::any::type_name::<T>()));
    }
    env.body.map_err(|e| format!("sender could not encode the message: {e}"))
}

impl<T: Serialize + DeserializeOwned> ractor::BytesConvertable for Wire<T> {
    fn into_bytes(self) -> Vec<u8> {
        match self {
            Wire::Ok(v) => encode(&v),
            Wire::Bad(reason) => bincode::serde::encode_to_vec(Envelope::<T> { version: PROTOCOL_VERSION, body: Err(reason) }, config())
                .expect("bincode encodes a string"),
        }
    }

    fn from_bytes(bytes: Vec<u8>) -> Self {
        match decode(&bytes) {
            Ok(v) => Wire::Ok(v),
            Err(e) => {
                BAD_MESSAGES.fetch_add(1, Ordering::Relaxed);
                crate::metrics::m().bad_messages.inc();
                tracing::warn!(error = %e, "dropping an undecodable message from a peer");
                Wire::Bad(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ractor::BytesConvertable;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Probe {
        name: String,
        n: u64,
        xs: Vec<f32>,
    }

    fn probe() -> Probe {
        Probe { name: "node2".into(), n: 7, xs: vec![1.5, -2.0] }
    }

    #[test]
    fn round_trip() {
        let bytes = Wire::Ok(probe()).into_bytes();
        assert_eq!(Wire::<Probe>::from_bytes(bytes), Wire::Ok(probe()));
    }

    #[test]
    fn bad_payloads_are_values_not_panics() {
        let before = bad_messages();
        let good = Wire::Ok(probe()).into_bytes();
        let mut wrong_version = good.clone();
        wrong_version[0] = 9;
        let mut trailing = good.clone();
        trailing.push(0);
        let cases: [(&str, Vec<u8>, &str); 5] = [
            ("empty", vec![], "no protocol version"),
            ("garbage", vec![0xff; 64], ""),
            ("wrong version", wrong_version, "protocol version 9"),
            ("truncated", good[..good.len() - 3].to_vec(), "undecodable"),
            ("trailing", trailing, "trailing bytes"),
        ];
        for (what, bytes, needle) in cases {
            match Wire::<Probe>::from_bytes(bytes) {
                Wire::Bad(e) => assert!(e.contains(needle), "{what}: {e}"),
                other => panic!("{what}: decoded as {other:?}"),
            }
        }
        assert!(bad_messages() >= before + 5);
    }

    #[test]
    fn a_huge_length_prefix_is_refused_without_allocating() {
        // A Vec<f32> claiming 2^40 elements.
        let mut bytes = encode(&Probe { name: String::new(), n: 0, xs: vec![] });
        bytes.truncate(bytes.len() - 1);
        bytes.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 1, 0, 0]);
        assert!(matches!(Wire::<Probe>::from_bytes(bytes), Wire::Bad(_)));
    }

    #[test]
    fn a_sender_side_failure_travels_as_an_error() {
        let bytes = Wire::<Probe>::Bad("nope".into()).into_bytes();
        assert_eq!(Wire::<Probe>::from_bytes(bytes), Wire::Bad("sender could not encode the message: nope".into()));
    }
}

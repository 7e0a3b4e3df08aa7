//! A fast hasher for the maps the request path reads: endpoint addresses, service names,
//! ports, peer identities.
//!
//! std's default (SipHash-1-3) costs 150 to 300 instructions per lookup there, several
//! lookups per request. This one mixes a word at a time (a rotate, a xor and a multiply,
//! as FxHash does). It gives no protection against chosen collisions, so it is only for
//! maps whose keys the proxy's own configuration or its authenticated peers insert: a
//! request can look a key up (a Host header, say) but never add one.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A `HashMap` with [`FastHasher`].
pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;

const K: u64 = 0x51_7c_c1_b7_27_22_0a_95;

/// See the module documentation.
#[derive(Debug, Default, Clone, Copy)]
pub struct FastHasher(u64);

impl FastHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(K);
    }
}

impl Hasher for FastHasher {
    #[inline]
    fn finish(&self) -> u64 {
        // The multiply leaves the low bits (which index the table) depending on the low
        // bits of the input only: fold the high half in.
        self.0 ^ (self.0 >> 32)
    }

    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            // The length tells "ab" from "ab\0".
            self.add(u64::from_le_bytes(w) ^ ((rest.len() as u64) << 59));
        }
    }

    #[inline]
    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }
    #[inline]
    fn write_u16(&mut self, n: u16) {
        self.add(u64::from(n));
    }
    #[inline]
    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }
    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }
    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;
    use std::net::SocketAddr;

    fn hash<T: std::hash::Hash>(v: &T) -> u64 {
        BuildHasherDefault::<FastHasher>::default().hash_one(v)
    }

    #[test]
    fn keys_that_differ_hash_apart_and_maps_work() {
        // Strings that differ in length only, in their last byte, or past the first word.
        let names = [
            "",
            "a",
            "a\0",
            "ab",
            "reviews",
            "reviews.default",
            "reviews.defaulu",
        ];
        let hashes: std::collections::HashSet<u64> = names.iter().map(hash).collect();
        assert_eq!(hashes.len(), names.len());
        // Addresses that differ in the port only spread over the table's low bits.
        let low: std::collections::HashSet<u64> = (8000..8064u16)
            .map(|p| hash(&SocketAddr::from(([127, 0, 0, 1], p))) & 63)
            .collect();
        assert!(low.len() > 32, "{} distinct low bits of 64", low.len());
        let mut m: FastMap<String, u16> = FastMap::default();
        for (i, n) in names.iter().enumerate() {
            m.insert((*n).to_string(), i as u16);
        }
        for (i, n) in names.iter().enumerate() {
            assert_eq!(m.get(*n), Some(&(i as u16)));
        }
        assert_eq!(m.get("reviews.other"), None);
    }
}

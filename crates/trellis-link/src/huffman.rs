//! Huffman decoding of HPACK string literals (RFC 7541 §5.2, Appendix B).
//!
//! Decoding walks the code four bits at a time through a table built once from the code
//! itself: a state is an inner node of the code tree, and each (state, nibble) pair says
//! which node follows and which symbol, if any, was completed on the way. No code is
//! shorter than five bits, so one nibble completes at most one symbol. The encoder of this
//! crate never Huffman-codes (a literal copied as is costs less than coding it and the
//! link's bytes are not scarce), but peers may.

use std::sync::OnceLock;

use crate::tables::HUFFMAN;

/// A symbol was completed in this step.
const EMIT: u8 = 1;
/// The step decoded EOS, which a string must never contain.
const FAIL: u8 = 2;

struct Fsm {
    /// `[state][nibble]` → (next state, symbol, flags).
    steps: Vec<[(u8, u8, u8); 16]>,
    /// States a string may end in: the root, or up to seven 1-bits into EOS (padding).
    accepting: [bool; 256],
}

fn fsm() -> &'static Fsm {
    static FSM: OnceLock<Fsm> = OnceLock::new();
    FSM.get_or_init(build)
}

/// A child that is a leaf: `LEAF | symbol`.
const LEAF: u16 = 0x8000;

fn build() -> Fsm {
    // The code tree: inner nodes with two children each (0 means "not yet made").
    let mut nodes: Vec<[u16; 2]> = vec![[0, 0]];
    for (sym, &(code, len)) in HUFFMAN.iter().enumerate() {
        let mut cur = 0usize;
        for i in (0..len).rev() {
            let bit = ((code >> i) & 1) as usize;
            if i == 0 {
                nodes[cur][bit] = LEAF | sym as u16;
            } else {
                if nodes[cur][bit] == 0 {
                    nodes.push([0, 0]);
                    nodes[cur][bit] = (nodes.len() - 1) as u16;
                }
                cur = nodes[cur][bit] as usize;
            }
        }
    }
    // A complete prefix code with 257 leaves has 256 inner nodes: one byte names a state.
    assert_eq!(nodes.len(), 256, "the HPACK Huffman code is complete");
    let mut steps = vec![[(0u8, 0u8, 0u8); 16]; nodes.len()];
    for (state, row) in steps.iter_mut().enumerate() {
        for (nibble, step) in row.iter_mut().enumerate() {
            let mut cur = state;
            let (mut sym, mut flags) = (0u8, 0u8);
            for i in (0..4).rev() {
                let child = nodes[cur][(nibble >> i) & 1];
                if child & LEAF != 0 {
                    let s = child & !LEAF;
                    if s == 256 {
                        flags |= FAIL;
                    } else {
                        sym = s as u8;
                        flags |= EMIT;
                    }
                    cur = 0;
                } else {
                    cur = child as usize;
                }
            }
            *step = (cur as u8, sym, flags);
        }
    }
    let mut accepting = [false; 256];
    let mut cur = 0usize;
    accepting[0] = true;
    for _ in 0..7 {
        cur = nodes[cur][1] as usize;
        accepting[cur] = true;
    }
    Fsm { steps, accepting }
}

/// Decodes a Huffman-coded string; `None` when it is not valid (EOS inside, or padding
/// that is not a short run of 1-bits).
pub(crate) fn decode(src: &[u8], dst: &mut Vec<u8>) -> Option<()> {
    let fsm = fsm();
    dst.reserve(src.len() + src.len() / 2);
    let mut state = 0usize;
    for &byte in src {
        for nibble in [byte >> 4, byte & 0x0f] {
            let (next, sym, flags) = fsm.steps[state][nibble as usize];
            if flags & FAIL != 0 {
                return None;
            }
            if flags & EMIT != 0 {
                dst.push(sym);
            }
            state = next as usize;
        }
    }
    fsm.accepting[state].then_some(())
}

#[cfg(test)]
pub(crate) fn encode(src: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u64, 0u32);
    for &b in src {
        let (code, len) = HUFFMAN[b as usize];
        acc = (acc << len) | u64::from(code);
        bits += u32::from(len);
        while bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    if bits > 0 {
        out.push(((acc << (8 - bits)) as u8) | (0xff >> bits));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    #[test]
    fn decodes_the_rfc_examples() {
        // RFC 7541 C.4.
        for (coded, text) in [
            ("f1e3 c2e5 f23a 6ba0 ab90 f4ff", "www.example.com"),
            ("a8eb 1064 9cbf", "no-cache"),
            ("25a8 49e9 5ba9 7d7f", "custom-key"),
            ("25a8 49e9 5bb8 e8b4 bf", "custom-value"),
        ] {
            let mut out = Vec::new();
            assert_eq!(decode(&hex(coded), &mut out), Some(()), "{text}");
            assert_eq!(out, text.as_bytes());
            assert_eq!(encode(text.as_bytes()), hex(coded));
        }
    }

    #[test]
    fn every_byte_round_trips() {
        let all: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
        for n in [0, 1, 7, 100, all.len()] {
            let mut out = Vec::new();
            assert_eq!(decode(&encode(&all[..n]), &mut out), Some(()));
            assert_eq!(out, &all[..n]);
        }
    }

    #[test]
    fn refuses_eos_and_bad_padding() {
        // EOS is thirty 1-bits: four 0xff bytes hold it.
        assert_eq!(decode(&[0xff, 0xff, 0xff, 0xff], &mut Vec::new()), None);
        // A whole byte of padding (eight 1-bits) is too long.
        let mut coded = encode(b"a");
        coded.push(0xff);
        assert_eq!(decode(&coded, &mut Vec::new()), None);
        // Padding with a 0-bit in it is not EOS's prefix: 'a' is 00011, padded 000.
        assert_eq!(decode(&[0b0001_1000], &mut Vec::new()), None);
    }
}

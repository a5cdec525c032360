//! An upper bound for any store on the `turns` workload: the turn's
//! bookkeeping done the cheapest way there is.
//!
//! One thread, plain hash maps with a one-multiply hasher, ids from a
//! counter mixer instead of a CSPRNG, no locks, no reference counts, no
//! metadata, no timestamps and no expiry index. A real store does all of
//! that and more, so its rate can only be lower; printing this beside the
//! stat floor shows how much of the floor's budget is left for the rest.

use std::collections::HashMap;
use std::fs;
use std::hash::{BuildHasherDefault, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

/// A multiply-rotate hasher, like rustc's FxHash.
#[derive(Default)]
struct Fx(u64);

impl Hasher for Fx {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
    fn write_u128(&mut self, x: u128) {
        self.write_u64(x as u64);
        self.write_u64((x >> 64) as u64);
    }
}

type Map<K, V> = HashMap<K, V, BuildHasherDefault<Fx>>;

/// The bookkeeping tables of the bound; one per thread.
#[derive(Default)]
pub struct Bound {
    refs: Map<u128, (u64, u64)>,
    files: Map<(u64, u64), u32>,
    scopes: Map<Box<str>, Vec<u128>>,
    next: u64,
}

impl Bound {
    /// `n` turns numbered from `first`, stat'ing the same files as the
    /// real workload (`pick(i, k)` is the `k`th file of turn `i`).
    pub fn turns<'a>(
        &mut self,
        first: usize,
        n: usize,
        pick: impl Fn(usize, usize) -> &'a PathBuf,
    ) {
        let mut scope = String::new();
        for i in first..first + n {
            use std::fmt::Write;
            scope.clear();
            write!(scope, "chat:b:msg:{i}").expect("format");
            let mut ids = [0u128; 4];
            for (k, id) in ids.iter_mut().enumerate() {
                let meta = fs::symlink_metadata(pick(i, k)).expect("stat");
                let key = (meta.dev(), meta.ino());
                self.next = self.next.wrapping_add(0x9e37_79b9_7f4a_7c15);
                *id = u128::from(self.next) << 64 | u128::from(self.next.rotate_left(17));
                *self.files.entry(key).or_default() += 1;
                self.refs.insert(*id, key);
                match self.scopes.get_mut(scope.as_str()) {
                    Some(held) => held.push(*id),
                    None => {
                        self.scopes.insert(scope.as_str().into(), vec![*id]);
                    }
                }
            }
            for j in 0..16 {
                std::hint::black_box(self.refs.get(&ids[j % 4]).expect("live ref"));
            }
            for id in self.scopes.remove(scope.as_str()).expect("scope") {
                let key = self.refs.remove(&id).expect("live ref");
                let count = self.files.get_mut(&key).expect("counted file");
                *count -= 1;
                if *count == 0 {
                    self.files.remove(&key);
                }
            }
        }
    }
}

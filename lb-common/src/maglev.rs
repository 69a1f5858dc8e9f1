//! Maglev lookup-table builder (userspace only).
//!
//! Each backend walks its own permutation of the table's slots (Eisenbud et
//! al., "Maglev", NSDI'16, section 3.4): slot `(offset + k * skip) % size` at
//! its `k`-th try. Both `offset` and `skip` come from hashes of the backend's
//! address, never its id, so an agent restart that renumbers ids produces the
//! same table with different numbers in it.
//!
//! Weights decide how many slots each backend gets, and in which order the
//! backends take their turns. A backend's exact share is `size * w / total`.
//! The free slots are handed out one at a time to whichever backend is
//! furthest below its exact share (water-filling), which takes the next free
//! slot in its permutation. From an empty table that gives each backend turns
//! in proportion to its weight, as Katran's `MaglevHashV2` does, but without
//! its rounding drift: every backend ends with the floor or the ceiling of its
//! exact share. With equal weights it is classic round-robin Maglev.
//!
//! [`rebuild_table`] starts from the previous table instead of an empty one,
//! so a change of the backend set moves only the slots it has to. Its output
//! depends on that history, though, so the agent builds every table with
//! [`build_table`]: several load balancer nodes with one config must hold the
//! same table, whatever each one went through.

use core::cmp::Reverse;
use core::net::SocketAddr;
use std::collections::{BinaryHeap, HashMap};
use std::vec;
use std::vec::Vec;

use crate::hash::mix32;

/// A backend as the table builder sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevBackend {
    /// What the table stores: the backend's index into `BACKENDS`. Must not be
    /// 0 (0 means "no backend") and must be unique within a set.
    pub id: u32,
    /// Hashed into the backend's permutation of the slots.
    pub addr: SocketAddr,
    /// Relative share of the slots; 0 means the backend gets none.
    pub weight: u32,
}

/// Returns a table of `size` entries, each a backend `id`; `size` must be prime
/// (debug_assert) and larger than the number of backends. Empty input or
/// all-zero weights → a table of zeros (0 = no backend).
///
/// Every backend with a non-zero weight holds the floor or the ceiling of its
/// exact share `size * weight / total_weight`. The table depends only on the
/// set of backends, not on the order of `backends`.
pub fn build_table(backends: &[MaglevBackend], size: u32) -> Vec<u32> {
    rebuild_table(&[], backends, size)
}

/// Rebuild after a change of the backend set, moving as few slots as possible:
/// slots whose current owner survives keep it; freed slots are handed out so that
/// shares again follow weights. Deterministic given (previous table, new set).
///
/// `previous` holds ids in the same numbering as `backends`. If it is empty,
/// all zero or not `size` long, the result equals [`build_table`].
///
/// The rules, in order:
/// 1. A slot keeps its owner if the owner is still in the set with a non-zero
///    weight. Slots of removed backends become free.
/// 2. A backend holding more than the ceiling of its exact share gives up its
///    least preferred slots (the last ones in its permutation) down to it.
/// 3. Free slots go one at a time to the backend furthest below its exact
///    share, which takes the next free slot in its permutation.
/// 4. A backend still two or more slots below its share takes slots from
///    backends above theirs, in its own permutation order, until it is less
///    than one slot below.
///
/// So every backend ends with more than `exact - 2` and fewer than
/// `exact + 1` slots, and a slot moves between two backends that both stay in
/// the set only in rule 2 or rule 4. Starting from a table in which every
/// backend held the floor or the ceiling of its share (every [`build_table`]
/// output is one):
/// - Removing one backend moves exactly its slots, each to a survivor. Every
///   survivor's share grows, so rule 2 never fires. Rule 4 never fires either:
///   if a survivor were still two short after rule 3, every slot handed out
///   went to a survivor at least that short, and adding up how far the shares
///   grew shows the removed backend held more than a slot below its share,
///   which the starting table rules out.
/// - Adding one backend moves slots only from the others to the newcomer,
///   each giving up about what its share shrank by, if every other share
///   shrinks by at least one slot (with equal weights: the newcomer's share is
///   at least one slot per backend). The others then all sit above their new
///   shares, so nobody but the newcomer is short.
///
/// Tables left by earlier rebuilds can have a backend one to two slots short.
/// Removing a backend from such a table can then, rarely, also move a slot or
/// two between survivors. In randomized runs (a few random adds, removes and
/// weight changes, then a removal) that happened about once in 6,000 runs on
/// tables of 7 to 31 slots, once in 50,000 on 101 and 257 slots, and not at
/// all in 15,000 runs on 1009 and 4099 slots.
pub fn rebuild_table(previous: &[u32], backends: &[MaglevBackend], size: u32) -> Vec<u32> {
    debug_assert!(is_prime(size), "Maglev table size {size} is not prime");
    debug_assert!(backends.len() < size as usize, "{} backends for {size} slots", backends.len());
    let live = sort_live(backends);
    debug_assert!(ids_are_valid(&live), "backend ids must be unique and non-zero");
    if live.is_empty() || size == 0 {
        return vec![0; size as usize];
    }
    let mut builder = Builder::new(&live, previous, size);
    builder.release_excess();
    builder.fill_free();
    builder.repair_shortfalls();
    builder.into_ids()
}

/// Backends with a non-zero weight, in a canonical order, so the table does
/// not depend on the order of the caller's slice.
fn sort_live(backends: &[MaglevBackend]) -> Vec<MaglevBackend> {
    let mut live: Vec<MaglevBackend> = backends.iter().filter(|b| b.weight > 0).copied().collect();
    live.sort_unstable_by_key(|b| (b.addr, b.id, b.weight));
    live
}

fn ids_are_valid(live: &[MaglevBackend]) -> bool {
    let mut ids: Vec<u32> = live.iter().map(|b| b.id).collect();
    ids.sort_unstable();
    ids.first() != Some(&0) && ids.windows(2).all(|w| w[0] != w[1])
}

fn is_prime(n: u32) -> bool {
    n >= 2 && (2..).take_while(|d| d * d <= u64::from(n)).all(|d| u64::from(n) % d != 0)
}

const fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

const OFFSET_SEED: u32 = 0x2545_f491;
const SKIP_SEED: u32 = 0x6c8e_9cf5;

/// Hash of a backend's address; different seeds give unrelated hashes. An
/// IPv6 address is folded to 32 bits first (`v6::fold_ip6`); IPv4 hashes as
/// it always has, so IPv4 tables stay what they were.
fn hash_addr(addr: &SocketAddr, seed: u32) -> u32 {
    let ip = match addr {
        SocketAddr::V4(a) => u32::from(*a.ip()),
        SocketAddr::V6(a) => crate::v6::fold_ip6(&crate::v6::ip6_raw(*a.ip())),
    };
    mix32(mix32(seed ^ ip) ^ u32::from(addr.port()))
}

/// The order in which one backend tries the slots.
#[derive(Clone, Copy, Debug)]
struct Permutation {
    offset: u64,
    skip: u64,
    /// `skip * inverse_skip % size == 1`, to find where a slot comes in the order.
    inverse_skip: u64,
    size: u64,
}

/// How far a walk along a permutation has got.
#[derive(Clone, Copy, Debug)]
struct Cursor {
    slot: u64,
    tried: u64,
}

impl Permutation {
    fn new(addr: &SocketAddr, size: u32) -> Self {
        let size = u64::from(size);
        let offset = u64::from(hash_addr(addr, OFFSET_SEED)) % size;
        let mut skip = u64::from(hash_addr(addr, SKIP_SEED)) % size.saturating_sub(1).max(1) + 1;
        // A skip coprime to size visits every slot. With a prime size every
        // skip in 1..size is; this only guards a release build given another size.
        while gcd(skip, size) != 1 {
            skip = skip % (size - 1) + 1;
        }
        Self { offset, skip, inverse_skip: inverse_mod(skip, size), size }
    }

    fn start(&self) -> Cursor {
        Cursor { slot: self.offset, tried: 0 }
    }

    /// The cursor's slot, moving the cursor on; `None` once it has visited them all.
    fn next(&self, cursor: &mut Cursor) -> Option<usize> {
        if cursor.tried == self.size {
            return None;
        }
        let slot = cursor.slot;
        cursor.tried += 1;
        // An add and a compare instead of a division: this is the hot loop.
        cursor.slot += self.skip;
        if cursor.slot >= self.size {
            cursor.slot -= self.size;
        }
        Some(slot as usize)
    }

    /// How many tries the backend needs to reach `slot`: low is preferred.
    fn rank(&self, slot: usize) -> u64 {
        let from_offset = (slot as u64 + self.size - self.offset) % self.size;
        // Both factors are below size <= 2^32, so the product fits in a u64.
        from_offset * self.inverse_skip % self.size
    }
}

/// `x` with `a * x % m == 1`, for coprime `a` and `m` (extended Euclid).
fn inverse_mod(a: u64, m: u64) -> u64 {
    let (mut r0, mut r1) = (i128::from(a), i128::from(m));
    let (mut s0, mut s1) = (1i128, 0i128);
    while r1 != 0 {
        let q = r0 / r1;
        (r0, r1) = (r1, r0 - q * r1);
        (s0, s1) = (s1, s0 - q * s1);
    }
    s0.rem_euclid(i128::from(m)) as u64
}

/// Marks a slot no backend holds yet; the output has 0 there.
const FREE: u32 = u32::MAX;

struct Member {
    id: u32,
    perm: Permutation,
    /// `size * weight`: the exact share, scaled by the total weight so shares
    /// compare as integers.
    share: i128,
    held: u32,
    /// Where `claim_free` and `steal_one` carry on from; the slots passed
    /// never become worth another look (see those functions).
    fill: Cursor,
    steal: Cursor,
}

struct Builder {
    /// Index into `members` per slot, or `FREE`.
    slots: Vec<u32>,
    members: Vec<Member>,
    total_weight: i128,
}

impl Builder {
    fn new(live: &[MaglevBackend], previous: &[u32], size: u32) -> Self {
        let slots = keep_survivors(previous, live, size);
        let mut held = vec![0u32; live.len()];
        for &s in slots.iter().filter(|&&s| s != FREE) {
            held[s as usize] += 1;
        }
        let members = live
            .iter()
            .zip(held)
            .map(|(b, held)| {
                let perm = Permutation::new(&b.addr, size);
                Member {
                    id: b.id,
                    perm,
                    share: i128::from(size) * i128::from(b.weight),
                    held,
                    fill: perm.start(),
                    steal: perm.start(),
                }
            })
            .collect();
        let total_weight = live.iter().map(|b| i128::from(b.weight)).sum();
        Self { slots, members, total_weight }
    }

    /// How far member `i` is below its exact share, in 1/total_weight slots
    /// (negative when above it).
    fn shortfall(&self, i: usize) -> i128 {
        let m = &self.members[i];
        m.share - i128::from(m.held) * self.total_weight
    }

    /// Slots member `i` holds above the ceiling of its exact share.
    fn excess(&self, i: usize) -> usize {
        let m = &self.members[i];
        let ceiling = (m.share + self.total_weight - 1) / self.total_weight;
        usize::try_from(i128::from(m.held) - ceiling).unwrap_or(0)
    }

    /// Rule 2: nobody keeps more than the ceiling of its share, and what goes
    /// is what the owner would have reached last.
    fn release_excess(&mut self) {
        let excess: Vec<usize> = (0..self.members.len()).map(|i| self.excess(i)).collect();
        if excess.iter().all(|&e| e == 0) {
            return;
        }
        // One pass over the table: walking each permutation backwards instead
        // is O(size) per member, because a member's own slots cluster early
        // in its permutation.
        let mut owned: Vec<Vec<(u64, usize)>> = vec![Vec::new(); self.members.len()];
        for (slot, &owner) in self.slots.iter().enumerate() {
            if owner != FREE && excess[owner as usize] > 0 {
                owned[owner as usize].push((self.members[owner as usize].perm.rank(slot), slot));
            }
        }
        for (i, mut slots) in owned.into_iter().enumerate().filter(|(i, _)| excess[*i] > 0) {
            let n = excess[i];
            slots.select_nth_unstable_by_key(n - 1, |&(rank, _)| Reverse(rank));
            for &(_, slot) in &slots[..n] {
                self.slots[slot] = FREE;
            }
            self.members[i].held -= n as u32;
        }
    }

    /// Rule 3: water-fill the free slots.
    fn fill_free(&mut self) {
        let free = self.slots.iter().filter(|&&s| s == FREE).count();
        let mut turns: BinaryHeap<_> = (0..self.members.len()).map(|i| self.fill_priority(i)).collect();
        for _ in 0..free {
            let Some((_, Reverse(i))) = turns.pop() else { break };
            if self.claim_free(i) {
                turns.push(self.fill_priority(i));
            }
        }
    }

    /// The largest shortfall first; ties to the first backend in canonical
    /// order, which makes equal weights take classic round-robin turns.
    fn fill_priority(&self, i: usize) -> (i128, Reverse<usize>) {
        (self.shortfall(i), Reverse(i))
    }

    /// Takes the next free slot in member `i`'s permutation. Slots it passes are
    /// taken, and stay taken until `repair_shortfalls`, so the walk never restarts.
    fn claim_free(&mut self, i: usize) -> bool {
        let m = &mut self.members[i];
        while let Some(slot) = m.perm.next(&mut m.fill) {
            if self.slots[slot] == FREE {
                self.slots[slot] = i as u32;
                m.held += 1;
                return true;
            }
        }
        false
    }

    /// Rule 4: lift members two or more slots short to less than one short.
    fn repair_shortfalls(&mut self) {
        let one = self.total_weight;
        for i in 0..self.members.len() {
            // Not one slot: the slack is what keeps a removal from moving
            // survivors' slots (see `rebuild_table`).
            if self.shortfall(i) < 2 * one {
                continue;
            }
            while self.shortfall(i) >= one && self.steal_one(i) {}
        }
    }

    /// Moves to member `i` the next slot in its permutation whose owner is above
    /// its exact share. Owners passed over are at or below their share and only
    /// ever lose slots from here on, so they never become donors later.
    fn steal_one(&mut self, i: usize) -> bool {
        loop {
            let m = &mut self.members[i];
            let Some(slot) = m.perm.next(&mut m.steal) else { return false };
            let owner = self.slots[slot];
            if owner != FREE && owner as usize != i && self.shortfall(owner as usize) < 0 {
                self.slots[slot] = i as u32;
                self.members[owner as usize].held -= 1;
                self.members[i].held += 1;
                return true;
            }
        }
    }

    fn into_ids(self) -> Vec<u32> {
        // FREE survives only if a permutation failed to cover the table, which
        // a coprime skip rules out; 0 is the safe "no backend" answer anyway.
        self.slots.iter().map(|&s| if s == FREE { 0 } else { self.members[s as usize].id }).collect()
    }
}

/// Rule 1: the previous table in member indices, with every slot whose owner
/// is gone marked `FREE`.
fn keep_survivors(previous: &[u32], live: &[MaglevBackend], size: u32) -> Vec<u32> {
    if previous.len() != size as usize {
        return vec![FREE; size as usize];
    }
    let index: HashMap<u32, u32> = live.iter().enumerate().map(|(i, b)| (b.id, i as u32)).collect();
    previous.iter().map(|id| if *id == 0 { FREE } else { index.get(id).copied().unwrap_or(FREE) }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::net::Ipv4Addr;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const SMALL: u32 = 4099;
    const LARGE: u32 = 65537;

    fn backend(id: u32, weight: u32) -> MaglevBackend {
        let [_, _, hi, lo] = id.to_be_bytes();
        MaglevBackend { id, addr: core::net::SocketAddrV4::new(Ipv4Addr::new(10, 1, hi, lo), 8080).into(), weight }
    }

    fn backends(n: u32, weight: u32) -> Vec<MaglevBackend> {
        (1..=n).map(|id| backend(id, weight)).collect()
    }

    fn counts(table: &[u32]) -> BTreeMap<u32, u32> {
        let mut counts = BTreeMap::new();
        for &id in table {
            *counts.entry(id).or_insert(0) += 1;
        }
        counts
    }

    /// `count - exact share`, in slots.
    fn error(table: &[u32], set: &[MaglevBackend], b: &MaglevBackend) -> f64 {
        let total: u64 = set.iter().map(|b| u64::from(b.weight)).sum();
        let exact = table.len() as f64 * f64::from(b.weight) / total as f64;
        let count = table.iter().filter(|&&id| id == b.id).count();
        count as f64 - exact
    }

    fn assert_all_live(table: &[u32], set: &[MaglevBackend]) {
        let live: Vec<u32> = set.iter().filter(|b| b.weight > 0).map(|b| b.id).collect();
        if live.is_empty() {
            assert!(table.iter().all(|&id| id == 0));
        } else {
            assert!(table.iter().all(|id| live.contains(id)), "a slot holds a dead or missing backend");
        }
    }

    /// Fraction of slots that differ, and how many went from one member of
    /// `survivors` to another.
    fn diff(before: &[u32], after: &[u32], survivors: &[u32]) -> (f64, usize) {
        let changed = before.iter().zip(after).filter(|(a, b)| a != b).count();
        let between =
            before.iter().zip(after).filter(|(a, b)| a != b && survivors.contains(a) && survivors.contains(b)).count();
        (changed as f64 / before.len() as f64, between)
    }

    #[test]
    fn empty() {
        assert_eq!(build_table(&[], SMALL), vec![0; SMALL as usize]);
        assert_eq!(build_table(&backends(5, 0), SMALL), vec![0; SMALL as usize]);
        assert_eq!(rebuild_table(&build_table(&backends(5, 1), SMALL), &[], SMALL), vec![0; SMALL as usize]);
    }

    #[test]
    fn single_backend_fills_table() {
        assert_eq!(build_table(&[backend(7, 3)], SMALL), vec![7; SMALL as usize]);
    }

    #[test]
    fn no_holes() {
        for n in [2, 3, 10, 100] {
            let table = build_table(&backends(n, 1), LARGE);
            assert_eq!(table.len(), LARGE as usize);
            assert!(table.iter().all(|&id| (1..=n).contains(&id)));
        }
    }

    #[test]
    fn deterministic() {
        let set = backends(30, 2);
        assert_eq!(build_table(&set, LARGE), build_table(&set, LARGE));
    }

    #[test]
    fn order_independent() {
        let set = backends(30, 2);
        let mut reversed = set.clone();
        reversed.reverse();
        assert_eq!(build_table(&set, LARGE), build_table(&reversed, LARGE));
    }

    #[test]
    fn permutation_follows_address_not_id() {
        let set = backends(10, 1);
        let renumbered: Vec<MaglevBackend> = set.iter().map(|b| MaglevBackend { id: b.id + 100, ..*b }).collect();
        let table = build_table(&set, SMALL);
        let shifted: Vec<u32> = table.iter().map(|id| id + 100).collect();
        assert_eq!(build_table(&renumbered, SMALL), shifted);
    }

    #[test]
    fn equal_weights_share_evenly() {
        let table = build_table(&backends(100, 1), LARGE);
        for count in counts(&table).values() {
            assert!(*count == 655 || *count == 656, "{count}");
        }
    }

    #[test]
    fn weights_change_shares() {
        let mut set = backends(10, 1);
        set[3].weight = 3;
        set[5].weight = 0;
        let counts = counts(&build_table(&set, SMALL));
        // Total weight 11: 4099 / 11 = 372.6 per unit.
        assert_eq!(counts.get(&set[5].id), None);
        assert!((1117..=1118).contains(&counts[&set[3].id]), "{counts:?}");
        assert!(counts.values().filter(|&&c| c < 1000).all(|c| (372..=373).contains(c)), "{counts:?}");
    }

    #[test]
    fn huge_weights_do_not_overflow() {
        let set = [backend(1, u32::MAX), backend(2, u32::MAX), backend(3, 1)];
        let counts = counts(&build_table(&set, LARGE));
        assert!((32768..=32769).contains(&counts[&1]) && (32768..=32769).contains(&counts[&2]), "{counts:?}");
    }

    #[test]
    fn rebuild_without_previous_equals_build() {
        let set = backends(20, 1);
        let expected = build_table(&set, SMALL);
        assert_eq!(rebuild_table(&[], &set, SMALL), expected);
        assert_eq!(rebuild_table(&vec![0; SMALL as usize], &set, SMALL), expected);
        assert_eq!(rebuild_table(&[1, 2, 3], &set, SMALL), expected);
    }

    #[test]
    fn rebuild_with_unchanged_set_changes_nothing() {
        let mut set = backends(20, 1);
        set[4].weight = 5;
        let table = build_table(&set, SMALL);
        assert_eq!(rebuild_table(&table, &set, SMALL), table);
    }

    #[test]
    fn rebuild_after_removal_moves_only_its_slots() {
        let set = backends(20, 1);
        let before = build_table(&set, LARGE);
        let after = rebuild_table(&before, &set[1..], LARGE);
        for (a, b) in before.iter().zip(&after) {
            assert!(a == b || *a == set[0].id);
        }
        assert!(!after.contains(&set[0].id));
    }

    #[test]
    fn rebuild_after_addition_moves_only_to_newcomer() {
        let set = backends(21, 1);
        let before = build_table(&set[..20], LARGE);
        let after = rebuild_table(&before, &set, LARGE);
        for (a, b) in before.iter().zip(&after) {
            assert!(a == b || *b == 21);
        }
        let newcomer = after.iter().filter(|&&id| id == 21).count();
        assert!((3120..=3121).contains(&newcomer), "{newcomer}"); // 65537 / 21 = 3120.8
    }

    #[test]
    fn rebuild_after_weight_change_follows_weights() {
        let mut set = backends(50, 1);
        let before = build_table(&set, LARGE);
        set[7].weight = 3;
        let after = rebuild_table(&before, &set, LARGE);
        for b in &set {
            assert!(error(&after, &set, b).abs() < 2.0, "{b:?}: {}", error(&after, &set, b));
        }
    }

    /// Run with `cargo test -p lb-common --features user --release -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing, meaningful in release only"]
    fn build_is_fast() {
        let set = backends(100, 1);
        let start = std::time::Instant::now();
        let table = build_table(&set, LARGE);
        let built = start.elapsed();
        let start = std::time::Instant::now();
        let rebuilt = rebuild_table(&table, &set[1..], LARGE);
        let removed = start.elapsed();
        let mut grown = set[1..].to_vec();
        grown.push(backend(101, 1));
        let start = std::time::Instant::now();
        let rebuilt = rebuild_table(&rebuilt, &grown, LARGE);
        let added = start.elapsed();
        std::println!("build {built:?}, rebuild after removal {removed:?}, after addition {added:?}");
        assert_eq!(rebuilt.len(), LARGE as usize);
        assert!(built.as_millis() < 50);
    }

    /// 1..=max backends with distinct addresses and weights from `weights`.
    fn backend_set(max: usize, weights: core::ops::RangeInclusive<u32>) -> impl Strategy<Value = Vec<MaglevBackend>> {
        prop::collection::btree_set((any::<u32>(), 1u16..), 1..=max)
            .prop_flat_map(move |addrs| {
                let n = addrs.len();
                (Just(addrs), prop::collection::vec(weights.clone(), n))
            })
            .prop_map(|(addrs, weights)| {
                addrs
                    .into_iter()
                    .zip(weights)
                    .zip(1..)
                    .map(|(((ip, port), weight), id)| MaglevBackend {
                        id,
                        addr: core::net::SocketAddrV4::new(Ipv4Addr::from(ip), port).into(),
                        weight,
                    })
                    .collect()
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn every_slot_holds_a_live_backend(set in backend_set(20, 0..=5)) {
            assert_all_live(&build_table(&set, SMALL), &set);
        }

        #[test]
        fn shares_follow_weights(set in backend_set(20, 0..=100)) {
            let table = build_table(&set, SMALL);
            for b in set.iter().filter(|b| b.weight > 0) {
                let error = error(&table, &set, b);
                prop_assert!(error.abs() < 1.0, "{b:?} off by {error} slots");
            }
        }

        #[test]
        fn equal_weights_within_two_percent(n in 1u32..=20) {
            let table = build_table(&backends(n, 1), LARGE);
            let fair = f64::from(LARGE) / f64::from(n);
            for count in counts(&table).values() {
                prop_assert!((f64::from(*count) - fair).abs() <= fair * 0.02, "{count} vs {fair}");
            }
        }

        #[test]
        fn independent_of_input_order(
            (set, shuffled) in backend_set(20, 0..=5).prop_flat_map(|s| (Just(s.clone()), Just(s).prop_shuffle()))
        ) {
            prop_assert_eq!(build_table(&set, SMALL), build_table(&shuffled, SMALL));
        }

        #[test]
        fn removal_disrupts_about_one_nth(set in backend_set(20, 1..=1), victim in any::<prop::sample::Index>()) {
            prop_assume!(set.len() >= 2);
            let gone = victim.get(&set).id;
            let survivors: Vec<MaglevBackend> = set.iter().filter(|b| b.id != gone).copied().collect();
            let ids: Vec<u32> = survivors.iter().map(|b| b.id).collect();
            let before = build_table(&set, LARGE);
            let after = build_table(&survivors, LARGE);
            let (changed, between) = diff(&before, &after, &ids);
            // Classic Maglev moves more than the 1/n minimum, the rest between
            // survivors. Measured over 1,500 random sets of up to 20 backends
            // at 65537 slots: 1.03/n median, 1.11/n worst. It grows with
            // n / size (one set each: 1.2/n for 50 backends, 1.6/n for 100,
            // 2.5/n for 200), and at 4099 slots two backends drawing the same
            // skip can push it to 2.2/n, hence LARGE here. `rebuild_table`
            // moves exactly 1/n.
            let n = set.len() as f64;
            prop_assert!(changed <= 1.6 / n, "{} of slots changed for n = {}", changed, n);
            prop_assert!(between as f64 <= 0.6 / n * f64::from(LARGE), "{} slots moved between survivors", between);
        }

        #[test]
        fn rebuild_removal_moves_exactly_the_removed_slots(
            set in backend_set(20, 1..=10),
            victim in any::<prop::sample::Index>(),
        ) {
            prop_assume!(set.len() >= 2);
            let gone = victim.get(&set).id;
            let survivors: Vec<MaglevBackend> = set.iter().filter(|b| b.id != gone).copied().collect();
            let before = build_table(&set, SMALL);
            let after = rebuild_table(&before, &survivors, SMALL);
            for (a, b) in before.iter().zip(&after) {
                prop_assert!(a == b || *a == gone, "slot moved from {} to {}", a, b);
            }
            assert_all_live(&after, &survivors);
        }

        #[test]
        fn rebuild_addition_moves_slots_only_to_the_newcomer(
            set in backend_set(20, 1..=10),
            pick in any::<prop::sample::Index>(),
        ) {
            prop_assume!(set.len() >= 2);
            let newcomer = *pick.get(&set);
            let old: Vec<MaglevBackend> = set.iter().filter(|b| b.id != newcomer.id).copied().collect();
            let before = build_table(&old, SMALL);
            let after = rebuild_table(&before, &set, SMALL);
            for (a, b) in before.iter().zip(&after) {
                prop_assert!(a == b || *b == newcomer.id, "slot moved from {} to {}", a, b);
            }
            let error = error(&after, &set, &newcomer);
            prop_assert!(-2.0 < error && error < 1.0, "newcomer off by {} slots", error);
        }

        #[test]
        fn rebuild_sequence_keeps_shares(
            start in backend_set(20, 1..=10),
            ops in prop::collection::vec((0u8..3, any::<prop::sample::Index>(), 0u32..=10), 1..12),
        ) {
            let mut set = start;
            let mut table = build_table(&set, SMALL);
            let mut next_id = 1000;
            for (op, pick, weight) in ops {
                match op {
                    0 if set.len() > 1 => { set.remove(pick.index(set.len())); }
                    1 => {
                        next_id += 1;
                        set.push(MaglevBackend { id: next_id, addr: core::net::SocketAddrV4::new(Ipv4Addr::from(next_id), 80).into(), weight });
                    }
                    _ => { let i = pick.index(set.len()); set[i].weight = weight; }
                }
                table = rebuild_table(&table, &set, SMALL);
                assert_all_live(&table, &set);
                for b in set.iter().filter(|b| b.weight > 0) {
                    let error = error(&table, &set, b);
                    prop_assert!(-2.0 < error && error < 1.0, "{:?} off by {} slots", b, error);
                }
            }
            // Nothing changed, so nothing moves, whatever the order.
            let mut reversed = set.clone();
            reversed.reverse();
            prop_assert_eq!(&rebuild_table(&table, &reversed, SMALL), &table);
        }
    }
}

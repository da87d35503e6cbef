//! The match index: which subscriptions an event may match, found without
//! evaluating every subscription's filter.
//!
//! Each subscription is placed by one condition that every matching record
//! must satisfy (a top-level conjunct of its filter):
//! - `field = value` or `field in (...)`: a hash bucket per value, so an event
//!   costs one lookup per indexed field, whatever the number of subscriptions;
//! - `field > value` and the other ranges: an ordered map per field, so an
//!   event visits only the subscriptions whose range contains its value;
//! - anything else (no filter, `or` at the top, `!=`...): the scan list, which
//!   every event visits.
//!
//! The index returns *candidates*: the caller still evaluates the full filter,
//! which is cheap once the candidates are few.

use super::{FieldPath, Filter, Op, Operand, Scalar};
use serde_json::Value;
use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;

/// Subscriptions identified by `u64` ids, each carrying a value `T` the
/// caller needs to deliver (typically an `Arc` of the subscription).
pub struct MatchIndex<T> {
    scan: SubSet<T>,
    equal: HashMap<FieldPath, EqualBuckets<T>>,
    ranges: HashMap<FieldPath, RangeIndex<T>>,
    placements: HashMap<u64, Placement>,
}

enum Placement {
    Scan,
    Equal(FieldPath, Vec<Scalar>),
    Range(FieldPath, RangeKey, Side),
}

impl<T: Clone> Default for MatchIndex<T> {
    fn default() -> Self {
        MatchIndex {
            scan: SubSet::default(),
            equal: HashMap::new(),
            ranges: HashMap::new(),
            placements: HashMap::new(),
        }
    }
}

impl<T: Clone> MatchIndex<T> {
    pub fn is_empty(&self) -> bool {
        self.placements.is_empty()
    }

    /// Adds subscription `id`. An id already present is replaced.
    pub fn insert(&mut self, id: u64, filter: Option<&Filter>, value: T) {
        self.remove(id);
        let placement = filter.map_or(Placement::Scan, choose_placement);
        match &placement {
            Placement::Scan => self.scan.insert(id, value),
            Placement::Equal(path, keys) => {
                let buckets = self.equal.entry(path.clone()).or_default();
                for key in keys {
                    buckets.bucket_mut(key).insert(id, value.clone());
                }
            }
            Placement::Range(path, key, side) => {
                let index = self.ranges.entry(path.clone()).or_default();
                index.side_mut(*side).insert((key.clone(), id), value);
            }
        }
        self.placements.insert(id, placement);
    }

    pub fn remove(&mut self, id: u64) -> bool {
        let Some(placement) = self.placements.remove(&id) else {
            return false;
        };
        match placement {
            Placement::Scan => {
                self.scan.remove(id);
            }
            Placement::Equal(path, keys) => {
                if let Some(buckets) = self.equal.get_mut(&path) {
                    for key in &keys {
                        buckets.remove(key, id);
                    }
                    if buckets.is_empty() {
                        self.equal.remove(&path);
                    }
                }
            }
            Placement::Range(path, key, side) => {
                if let Some(index) = self.ranges.get_mut(&path) {
                    index.side_mut(side).remove(&(key, id));
                    if index.lower.is_empty() && index.upper.is_empty() {
                        self.ranges.remove(&path);
                    }
                }
            }
        }
        true
    }

    /// Calls `visit` once for every subscription that may match `record`.
    pub fn candidates(&self, record: &Value, mut visit: impl FnMut(u64, &T)) {
        for (id, value) in self.scan.iter() {
            visit(id, value);
        }
        for (path, buckets) in &self.equal {
            let Some(field) = path.lookup(record) else {
                continue;
            };
            if let Some(bucket) = buckets.get(field) {
                for (id, value) in bucket.iter() {
                    visit(id, value);
                }
            }
        }
        for (path, index) in &self.ranges {
            if let Some(field) = path.lookup(record) {
                index.visit(field, &mut visit);
            }
        }
    }
}

/// The condition a subscription is indexed by: an equality first (the most
/// selective), else a range, else none.
fn choose_placement(filter: &Filter) -> Placement {
    let conjuncts: &[Filter] = match filter {
        Filter::All(children) => children,
        other => std::slice::from_ref(other),
    };
    let conditions = conjuncts.iter().filter_map(|f| match f {
        Filter::Condition(c) => Some(c),
        _ => None,
    });
    let mut range = None;
    for c in conditions {
        match (c.op, &c.operand) {
            (Op::Eq, Operand::Scalar(s)) => {
                return Placement::Equal(c.path.clone(), vec![s.clone()]);
            }
            (Op::In, Operand::List(items)) => {
                return Placement::Equal(c.path.clone(), items.clone());
            }
            (Op::Gt | Op::Gte | Op::Lt | Op::Lte, Operand::Scalar(s)) if range.is_none() => {
                let key = match s {
                    Scalar::Number(n) => RangeKey::Number(OrdF64(*n)),
                    Scalar::String(s) => RangeKey::String(s.clone()),
                    _ => continue,
                };
                let side = match c.op {
                    Op::Gt => Side::Lower { strict: true },
                    Op::Gte => Side::Lower { strict: false },
                    Op::Lt => Side::Upper { strict: true },
                    _ => Side::Upper { strict: false },
                };
                range = Some(Placement::Range(c.path.clone(), key, side));
            }
            _ => {}
        }
    }
    range.unwrap_or(Placement::Scan)
}

/// A set with O(1) insert, remove and dense iteration.
pub(crate) struct SubSet<T> {
    items: Vec<(u64, T)>,
    positions: HashMap<u64, usize>,
}

impl<T> Default for SubSet<T> {
    fn default() -> Self {
        SubSet {
            items: Vec::new(),
            positions: HashMap::new(),
        }
    }
}

impl<T> SubSet<T> {
    pub(crate) fn insert(&mut self, id: u64, value: T) {
        if let Some(&at) = self.positions.get(&id) {
            self.items[at].1 = value;
            return;
        }
        self.positions.insert(id, self.items.len());
        self.items.push((id, value));
    }

    /// Takes `id` out; whether it was in.
    pub(crate) fn remove(&mut self, id: u64) -> bool {
        let Some(at) = self.positions.remove(&id) else {
            return false;
        };
        self.items.swap_remove(at);
        if let Some((moved, _)) = self.items.get(at) {
            self.positions.insert(*moved, at);
        }
        true
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, &T)> {
        self.items.iter().map(|(id, value)| (*id, value))
    }
}

/// Equality buckets of one field. Strings are keyed by `str` so a lookup
/// does not allocate.
struct EqualBuckets<T> {
    strings: HashMap<Box<str>, SubSet<T>>,
    numbers: HashMap<u64, SubSet<T>>,
    bools: [SubSet<T>; 2],
    nulls: SubSet<T>,
}

impl<T> Default for EqualBuckets<T> {
    fn default() -> Self {
        EqualBuckets {
            strings: HashMap::new(),
            numbers: HashMap::new(),
            bools: Default::default(),
            nulls: SubSet::default(),
        }
    }
}

/// Numbers that compare equal hash equal: `-0.0` is folded into `0.0`.
fn number_key(n: f64) -> u64 {
    if n == 0.0 { 0 } else { n.to_bits() }
}

impl<T> EqualBuckets<T> {
    fn bucket_mut(&mut self, key: &Scalar) -> &mut SubSet<T> {
        match key {
            Scalar::String(s) => self.strings.entry(s.clone()).or_default(),
            Scalar::Number(n) => self.numbers.entry(number_key(*n)).or_default(),
            Scalar::Bool(b) => &mut self.bools[*b as usize],
            Scalar::Null => &mut self.nulls,
        }
    }

    fn remove(&mut self, key: &Scalar, id: u64) {
        match key {
            Scalar::String(s) => {
                if let Some(set) = self.strings.get_mut(&**s) {
                    set.remove(id);
                    if set.is_empty() {
                        self.strings.remove(&**s);
                    }
                }
            }
            Scalar::Number(n) => {
                let key = number_key(*n);
                if let Some(set) = self.numbers.get_mut(&key) {
                    set.remove(id);
                    if set.is_empty() {
                        self.numbers.remove(&key);
                    }
                }
            }
            Scalar::Bool(b) => {
                self.bools[*b as usize].remove(id);
            }
            Scalar::Null => {
                self.nulls.remove(id);
            }
        }
    }

    fn get(&self, value: &Value) -> Option<&SubSet<T>> {
        match value {
            Value::String(s) => self.strings.get(s.as_str()),
            Value::Number(n) => self.numbers.get(&number_key(n.as_f64()?)),
            Value::Bool(b) => Some(&self.bools[*b as usize]),
            Value::Null => Some(&self.nulls),
            _ => None,
        }
    }

    fn is_empty(&self) -> bool {
        self.strings.is_empty()
            && self.numbers.is_empty()
            && self.bools.iter().all(SubSet::is_empty)
            && self.nulls.is_empty()
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct OrdF64(f64);

impl Eq for OrdF64 {}
impl PartialOrd for OrdF64 {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for OrdF64 {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// A range bound. Numbers sort before strings, so each type occupies its
/// own stretch of the ordered map.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum RangeKey {
    Number(OrdF64),
    String(Box<str>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// `field > key` (strict) or `field >= key`.
    Lower { strict: bool },
    /// `field < key` (strict) or `field <= key`.
    Upper { strict: bool },
}

type RangeMap<T> = BTreeMap<(RangeKey, u64), (bool, T)>;

struct RangeIndex<T> {
    lower: RangeMap<T>,
    upper: RangeMap<T>,
}

impl<T> Default for RangeIndex<T> {
    fn default() -> Self {
        RangeIndex {
            lower: BTreeMap::new(),
            upper: BTreeMap::new(),
        }
    }
}

struct SideMut<'a, T> {
    map: &'a mut RangeMap<T>,
    strict: bool,
}

impl<T> SideMut<'_, T> {
    fn insert(&mut self, key: (RangeKey, u64), value: T) {
        self.map.insert(key, (self.strict, value));
    }

    fn remove(&mut self, key: &(RangeKey, u64)) {
        self.map.remove(key);
    }
}

impl<T> RangeIndex<T> {
    fn side_mut(&mut self, side: Side) -> SideMut<'_, T> {
        match side {
            Side::Lower { strict } => SideMut {
                map: &mut self.lower,
                strict,
            },
            Side::Upper { strict } => SideMut {
                map: &mut self.upper,
                strict,
            },
        }
    }

    fn visit(&self, field: &Value, visit: &mut impl FnMut(u64, &T)) {
        let (value, first, last) = match field {
            Value::Number(n) => match n.as_f64() {
                Some(n) => (
                    RangeKey::Number(OrdF64(n)),
                    RangeKey::Number(OrdF64(f64::NEG_INFINITY)),
                    Bound::Included((RangeKey::Number(OrdF64(f64::INFINITY)), u64::MAX)),
                ),
                None => return,
            },
            Value::String(s) => (
                RangeKey::String(s.as_str().into()),
                RangeKey::String("".into()),
                Bound::Unbounded,
            ),
            _ => return,
        };
        // Lower bounds at or below the value: `value > bound` holds.
        let below = (
            Bound::Included((first, 0)),
            Bound::Included((value.clone(), u64::MAX)),
        );
        for ((bound, id), (strict, sub)) in self.lower.range(below) {
            if !(*strict && *bound == value) {
                visit(*id, sub);
            }
        }
        // Upper bounds at or above the value: `value < bound` holds.
        let above = (Bound::Included((value.clone(), 0)), last);
        for ((bound, id), (strict, sub)) in self.upper.range(above) {
            if !(*strict && *bound == value) {
                visit(*id, sub);
            }
        }
    }
}

//! Filters: which events a subscriber wants.
//!
//! One language with three spellings, all producing the same [`Filter`] tree:
//! the typed protobuf tree (converted at the gRPC edge), the text form
//! ([`Filter::parse`], e.g. `price > 100 && status = "published"`), and the
//! JSON-object shorthand of the seeds ([`Filter::from_shorthand`],
//! `{"published": true}`).
//!
//! Evaluation is typed: numbers compare as numbers, strings as strings, and a
//! type mismatch or a missing field is "no match", never an error. The tree
//! is built once per subscription with paths pre-split and literals
//! pre-typed, so evaluating it allocates nothing. [`index`] finds the
//! subscriptions an event may match without looking at every one.
//!
//! This module depends on nothing else in the crate.

pub mod index;
mod parse;

pub use parse::ParseError;

use serde_json::Value;
use std::fmt;

/// Upper bounds that keep a hostile filter from costing much.
pub const MAX_DEPTH: usize = 32;
pub const MAX_CONDITIONS: usize = 256;
pub const MAX_TEXT: usize = 8192;

#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    /// Every child matches (and). An empty list matches everything.
    All(Vec<Filter>),
    /// At least one child matches (or).
    Any(Vec<Filter>),
    /// The child does not match.
    Not(Box<Filter>),
    Condition(Condition),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    pub path: FieldPath,
    pub op: Op,
    pub operand: Operand,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Gt,
    Gte,
    Lt,
    Lte,
    In,
    NotIn,
    Contains,
    StartsWith,
    Exists,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Eq => "=",
            Op::Ne => "!=",
            Op::Gt => ">",
            Op::Gte => ">=",
            Op::Lt => "<",
            Op::Lte => "<=",
            Op::In => "in",
            Op::NotIn => "not-in",
            Op::Contains => "contains",
            Op::StartsWith => "starts-with",
            Op::Exists => "exists",
        }
    }
}

/// A typed literal. JSON numbers are compared as `f64`.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    Null,
    Bool(bool),
    Number(f64),
    String(Box<str>),
}

impl Scalar {
    /// The scalar a JSON value is, or `None` for arrays and objects.
    pub fn from_json(value: &Value) -> Option<Scalar> {
        Some(match value {
            Value::Null => Scalar::Null,
            Value::Bool(b) => Scalar::Bool(*b),
            Value::Number(n) => Scalar::Number(n.as_f64()?),
            Value::String(s) => Scalar::String(s.as_str().into()),
            Value::Array(_) | Value::Object(_) => return None,
        })
    }

    /// Typed equality against a JSON value: same type and same value.
    fn equals(&self, value: &Value) -> bool {
        match (self, value) {
            (Scalar::Null, Value::Null) => true,
            (Scalar::Bool(a), Value::Bool(b)) => a == b,
            (Scalar::Number(a), Value::Number(b)) => b.as_f64() == Some(*a),
            (Scalar::String(a), Value::String(b)) => **a == **b,
            _ => false,
        }
    }

    fn same_type(&self, value: &Value) -> bool {
        matches!(
            (self, value),
            (Scalar::Null, Value::Null)
                | (Scalar::Bool(_), Value::Bool(_))
                | (Scalar::Number(_), Value::Number(_))
                | (Scalar::String(_), Value::String(_))
        )
    }

    /// Typed ordering of `value` relative to this literal: numbers with
    /// numbers, strings with strings (byte order); anything else is `None`.
    fn order_of(&self, value: &Value) -> Option<std::cmp::Ordering> {
        match (self, value) {
            (Scalar::Number(a), Value::Number(b)) => b.as_f64()?.partial_cmp(a),
            (Scalar::String(a), Value::String(b)) => Some(b.as_str().cmp(a)),
            _ => None,
        }
    }
}

impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scalar::Null => f.write_str("null"),
            Scalar::Bool(b) => write!(f, "{b}"),
            Scalar::Number(n) => write!(f, "{n}"),
            Scalar::String(s) => write!(f, "{:?}", s),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    None,
    Scalar(Scalar),
    List(Vec<Scalar>),
}

/// A dotted path into a record, split once. A segment that is a number also
/// indexes arrays (`tags.0`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FieldPath {
    segments: Box<[Box<str>]>,
}

impl FieldPath {
    /// Splits `author.name` into its parts; `None` if a part is empty.
    pub fn parse(path: &str) -> Option<FieldPath> {
        let segments: Vec<Box<str>> = path.split('.').map(Into::into).collect();
        if segments.iter().any(|s| s.is_empty()) {
            return None;
        }
        Some(FieldPath {
            segments: segments.into(),
        })
    }

    /// The value at this path, if every step exists.
    pub fn lookup<'v>(&self, record: &'v Value) -> Option<&'v Value> {
        self.segments
            .iter()
            .try_fold(record, |value, segment| match value {
                Value::Object(map) => map.get(&**segment),
                Value::Array(items) => items.get(segment.parse::<usize>().ok()?),
                _ => None,
            })
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.segments.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            f.write_str(segment)?;
        }
        Ok(())
    }
}

/// A filter that cannot be built, from any spelling.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FilterError {
    #[error("invalid filter: {0}")]
    Parse(#[from] ParseError),
    #[error("invalid filter: {0}")]
    Invalid(String),
}

impl Condition {
    /// Builds a condition after checking that the operand fits the operator.
    pub fn new(path: &str, op: Op, operand: Operand) -> Result<Condition, FilterError> {
        let path = FieldPath::parse(path)
            .ok_or_else(|| FilterError::Invalid(format!("invalid field path {path:?}")))?;
        let fits = match (&op, &operand) {
            (Op::Exists, Operand::None) => true,
            (Op::In | Op::NotIn, Operand::List(items)) => !items.is_empty(),
            (Op::StartsWith, Operand::Scalar(Scalar::String(_))) => true,
            (Op::Eq | Op::Ne | Op::Contains, Operand::Scalar(_)) => true,
            (
                Op::Gt | Op::Gte | Op::Lt | Op::Lte,
                Operand::Scalar(Scalar::Number(_) | Scalar::String(_)),
            ) => true,
            _ => false,
        };
        if !fits {
            let wants = match op {
                Op::Exists => "no value",
                Op::In | Op::NotIn => "a non-empty list of values",
                Op::StartsWith => "a string",
                Op::Gt | Op::Gte | Op::Lt | Op::Lte => "a number or a string",
                Op::Eq | Op::Ne | Op::Contains => "a single value",
            };
            return Err(FilterError::Invalid(format!(
                "operator {} on {path} takes {wants}",
                op.as_str()
            )));
        }
        Ok(Condition { path, op, operand })
    }

    pub fn matches(&self, record: &Value) -> bool {
        let Some(value) = self.path.lookup(record) else {
            return false;
        };
        use std::cmp::Ordering::*;
        match (&self.op, &self.operand) {
            (Op::Exists, _) => !value.is_null(),
            (Op::Eq, Operand::Scalar(s)) => s.equals(value),
            (Op::Ne, Operand::Scalar(s)) => s.same_type(value) && !s.equals(value),
            (Op::Gt, Operand::Scalar(s)) => s.order_of(value) == Some(Greater),
            (Op::Gte, Operand::Scalar(s)) => matches!(s.order_of(value), Some(Greater | Equal)),
            (Op::Lt, Operand::Scalar(s)) => s.order_of(value) == Some(Less),
            (Op::Lte, Operand::Scalar(s)) => matches!(s.order_of(value), Some(Less | Equal)),
            (Op::In, Operand::List(items)) => items.iter().any(|s| s.equals(value)),
            (Op::NotIn, Operand::List(items)) => {
                items.iter().any(|s| s.same_type(value)) && !items.iter().any(|s| s.equals(value))
            }
            (Op::Contains, Operand::Scalar(s)) => match (value, s) {
                (Value::String(haystack), Scalar::String(needle)) => haystack.contains(&**needle),
                (Value::Array(items), s) => items.iter().any(|item| s.equals(item)),
                _ => false,
            },
            (Op::StartsWith, Operand::Scalar(Scalar::String(prefix))) => {
                value.as_str().is_some_and(|s| s.starts_with(&**prefix))
            }
            _ => false,
        }
    }
}

impl Filter {
    /// Parses the text form; see the README for the grammar.
    pub fn parse(text: &str) -> Result<Filter, FilterError> {
        Ok(parse::parse(text)?)
    }

    /// The JSON-object shorthand of the seeds: every key must equal its
    /// value (`{"published": true}`), a nested object names a nested field
    /// (`{"author": {"name": "ann"}}`), an array means "one of" (`in`).
    pub fn from_shorthand(object: &serde_json::Map<String, Value>) -> Result<Filter, FilterError> {
        let mut conditions = Vec::new();
        shorthand_into(object, "", &mut conditions)?;
        let filter = Filter::All(conditions);
        filter.check_limits()?;
        Ok(filter)
    }

    pub fn matches(&self, record: &Value) -> bool {
        match self {
            Filter::All(children) => children.iter().all(|c| c.matches(record)),
            Filter::Any(children) => children.iter().any(|c| c.matches(record)),
            Filter::Not(child) => !child.matches(record),
            Filter::Condition(condition) => condition.matches(record),
        }
    }

    /// Replaces parameters (string values `$name`) by `lookup(name)`: a
    /// scalar stays a scalar; a list turns `=` into `in` and joins `in`
    /// lists. A parameter `lookup` does not know is an error naming it.
    pub fn bind(&self, lookup: &impl Fn(&str) -> Option<Value>) -> Result<Filter, FilterError> {
        fn param(s: &Scalar) -> Option<&str> {
            match s {
                Scalar::String(text) => text.strip_prefix('$').filter(|n| !n.is_empty()),
                _ => None,
            }
        }
        let resolve = |name: &str| -> Result<Vec<Scalar>, FilterError> {
            let value = lookup(name).ok_or_else(|| {
                FilterError::Invalid(format!("the parameter ${name} has no value"))
            })?;
            let items = match &value {
                Value::Array(items) => items.iter().collect(),
                single => vec![single],
            };
            items
                .into_iter()
                .map(|v| {
                    Scalar::from_json(v).ok_or_else(|| {
                        FilterError::Invalid(format!("the value of ${name} is not a scalar"))
                    })
                })
                .collect()
        };
        Ok(match self {
            Filter::All(children) => Filter::All(
                children
                    .iter()
                    .map(|c| c.bind(lookup))
                    .collect::<Result<_, _>>()?,
            ),
            Filter::Any(children) => Filter::Any(
                children
                    .iter()
                    .map(|c| c.bind(lookup))
                    .collect::<Result<_, _>>()?,
            ),
            Filter::Not(child) => Filter::Not(Box::new(child.bind(lookup)?)),
            Filter::Condition(c) => {
                let mut c = c.clone();
                match &c.operand {
                    Operand::Scalar(s) => {
                        if let Some(name) = param(s) {
                            let mut values = resolve(name)?;
                            if values.len() == 1 {
                                c.operand = Operand::Scalar(values.pop().expect("one value"));
                            } else if c.op == Op::Eq && !values.is_empty() {
                                c.op = Op::In;
                                c.operand = Operand::List(values);
                            } else {
                                return Err(FilterError::Invalid(format!(
                                    "${name} must hold one value for operator {}",
                                    c.op.as_str()
                                )));
                            }
                        }
                    }
                    Operand::List(items) => {
                        let mut bound = Vec::new();
                        for item in items {
                            match param(item) {
                                Some(name) => bound.extend(resolve(name)?),
                                None => bound.push(item.clone()),
                            }
                        }
                        c.operand = Operand::List(bound);
                    }
                    Operand::None => {}
                }
                Filter::Condition(c)
            }
        })
    }

    /// How many conditions the tree holds: what its memory grows with.
    pub fn condition_count(&self) -> usize {
        match self {
            Filter::All(children) | Filter::Any(children) => {
                children.iter().map(Filter::condition_count).sum()
            }
            Filter::Not(child) => child.condition_count(),
            Filter::Condition(_) => 1,
        }
    }

    /// Refuses trees deeper than [`MAX_DEPTH`] or with more than
    /// [`MAX_CONDITIONS`] conditions.
    pub fn check_limits(&self) -> Result<(), FilterError> {
        fn walk(filter: &Filter, depth: usize, count: &mut usize) -> Result<(), FilterError> {
            if depth > MAX_DEPTH {
                return Err(FilterError::Invalid(format!(
                    "filter nests deeper than {MAX_DEPTH} levels"
                )));
            }
            match filter {
                Filter::All(children) | Filter::Any(children) => {
                    for child in children {
                        walk(child, depth + 1, count)?;
                    }
                }
                Filter::Not(child) => walk(child, depth + 1, count)?,
                Filter::Condition(_) => {
                    *count += 1;
                    if *count > MAX_CONDITIONS {
                        return Err(FilterError::Invalid(format!(
                            "filter has more than {MAX_CONDITIONS} conditions"
                        )));
                    }
                }
            }
            Ok(())
        }
        walk(self, 0, &mut 0)
    }
}

fn shorthand_into(
    object: &serde_json::Map<String, Value>,
    prefix: &str,
    out: &mut Vec<Filter>,
) -> Result<(), FilterError> {
    for (key, value) in object {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        let condition = match value {
            Value::Object(nested) => {
                shorthand_into(nested, &path, out)?;
                continue;
            }
            Value::Array(items) => {
                let list = items
                    .iter()
                    .map(|item| {
                        Scalar::from_json(item).ok_or_else(|| {
                            FilterError::Invalid(format!(
                                "the list for {path:?} may hold only strings, numbers, booleans and null"
                            ))
                        })
                    })
                    .collect::<Result<_, _>>()?;
                Condition::new(&path, Op::In, Operand::List(list))?
            }
            scalar => Condition::new(
                &path,
                Op::Eq,
                Operand::Scalar(Scalar::from_json(scalar).expect("a scalar")),
            )?,
        };
        out.push(Filter::Condition(condition));
    }
    Ok(())
}

impl fmt::Display for Filter {
    /// The text form, which [`Filter::parse`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let join = |f: &mut fmt::Formatter<'_>, children: &[Filter], sep: &str| {
            f.write_str("(")?;
            for (i, child) in children.iter().enumerate() {
                if i > 0 {
                    f.write_str(sep)?;
                }
                write!(f, "{child}")?;
            }
            f.write_str(")")
        };
        match self {
            Filter::All(children) if children.is_empty() => f.write_str("true"),
            Filter::Any(children) if children.is_empty() => f.write_str("false"),
            Filter::All(children) => join(f, children, " && "),
            Filter::Any(children) => join(f, children, " || "),
            Filter::Not(child) => write!(f, "!{child}"),
            Filter::Condition(c) => match &c.operand {
                Operand::None => write!(f, "{} {}", c.path, c.op.as_str()),
                Operand::Scalar(s) => write!(f, "{} {} {s}", c.path, c.op.as_str()),
                Operand::List(items) => {
                    write!(f, "{} {} (", c.path, c.op.as_str())?;
                    for (i, s) in items.iter().enumerate() {
                        if i > 0 {
                            f.write_str(", ")?;
                        }
                        write!(f, "{s}")?;
                    }
                    f.write_str(")")
                }
            },
        }
    }
}

#[cfg(test)]
mod tests;

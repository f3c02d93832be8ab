//! What the rules read an object through: [`Json`], implemented by `serde_json`'s [`Value`] and
//! by [`Node`], the tree the admission path builds. Pure.
//!
//! A review's object is read once and dropped: building a `Value` from it (a `String` for every
//! key and string, a `BTreeMap` per object) cost more than reading the review, and freeing it as
//! much again. A [`Node`] borrows its strings from the body (a string with escapes is the only
//! copy) and keeps an object's members in a `Vec`, in the order the apiserver wrote them.
//! Everything else (the cluster view, the reconciler, the doctor, the tests) hands the core a
//! `Value`, so the core is written once, against [`Json`], and the two must decide alike: the
//! "pruned parse" law in [`super::laws`] holds every proptest and fuzz case to it.

use std::borrow::Cow;

use serde_json::{Map, Number, Value};

/// A JSON value, read only.
pub trait Json: Sized {
    /// What [`Json::as_object`] returns.
    type Obj: Members<Item = Self>;

    /// The member `key` of an object: the last, if it is written twice (as `serde_json` reads it).
    fn get(&self, key: &str) -> Option<&Self>;
    fn as_str(&self) -> Option<&str>;
    fn as_i64(&self) -> Option<i64>;
    fn as_object(&self) -> Option<&Self::Obj>;
    fn as_array(&self) -> Option<&[Self]>;
    fn is_null(&self) -> bool;
    /// An owned copy, as `serde_json` would have read it: an operation's value.
    fn to_value(&self) -> Value;
    /// Equal to `other` as `serde_json`'s `==` would find them.
    fn eq_value(&self, other: &Value) -> bool;
}

/// A JSON object, read only.
pub trait Members {
    type Item: Json;

    /// The member `key`: the last, if it is written twice.
    fn get(&self, key: &str) -> Option<&Self::Item>;
    fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }
    /// Every member, in no particular order; a key written twice may come twice, the last last.
    fn entries(&self) -> impl Iterator<Item = (&str, &Self::Item)>;
    /// Equal to `other` as `serde_json`'s `==` would find them.
    fn eq_map(&self, other: &Map<String, Value>) -> bool;
}

impl Json for Value {
    type Obj = Map<String, Value>;

    fn get(&self, key: &str) -> Option<&Self> {
        Value::get(self, key)
    }
    fn as_str(&self) -> Option<&str> {
        Value::as_str(self)
    }
    fn as_i64(&self) -> Option<i64> {
        Value::as_i64(self)
    }
    fn as_object(&self) -> Option<&Self::Obj> {
        Value::as_object(self)
    }
    fn as_array(&self) -> Option<&[Self]> {
        Value::as_array(self).map(Vec::as_slice)
    }
    fn is_null(&self) -> bool {
        Value::is_null(self)
    }
    fn to_value(&self) -> Value {
        self.clone()
    }
    fn eq_value(&self, other: &Value) -> bool {
        self == other
    }
}

impl Members for Map<String, Value> {
    type Item = Value;

    fn get(&self, key: &str) -> Option<&Value> {
        Map::get(self, key)
    }
    fn entries(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.iter().map(|(k, v)| (k.as_str(), v))
    }
    fn eq_map(&self, other: &Map<String, Value>) -> bool {
        self == other
    }
}

/// A JSON value whose strings are borrowed from the text it was read from where they can be.
#[derive(Debug, Clone, PartialEq)]
pub enum Node<'a> {
    Null,
    Bool(bool),
    Number(Number),
    String(Cow<'a, str>),
    Array(Vec<Node<'a>>),
    Object(Object<'a>),
}

/// An object's members in the order they were written, repeats included.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Object<'a>(pub Vec<(Cow<'a, str>, Node<'a>)>);

impl<'a> Json for Node<'a> {
    type Obj = Object<'a>;

    fn get(&self, key: &str) -> Option<&Self> {
        match self {
            Node::Object(o) => o.get(key),
            _ => None,
        }
    }
    fn as_str(&self) -> Option<&str> {
        match self {
            Node::String(s) => Some(s),
            _ => None,
        }
    }
    fn as_i64(&self) -> Option<i64> {
        match self {
            Node::Number(n) => n.as_i64(),
            _ => None,
        }
    }
    fn as_object(&self) -> Option<&Self::Obj> {
        match self {
            Node::Object(o) => Some(o),
            _ => None,
        }
    }
    fn as_array(&self) -> Option<&[Self]> {
        match self {
            Node::Array(a) => Some(a),
            _ => None,
        }
    }
    fn is_null(&self) -> bool {
        matches!(self, Node::Null)
    }
    fn to_value(&self) -> Value {
        match self {
            Node::Null => Value::Null,
            Node::Bool(b) => Value::Bool(*b),
            Node::Number(n) => Value::Number(n.clone()),
            Node::String(s) => Value::String(s.clone().into_owned()),
            Node::Array(a) => Value::Array(a.iter().map(Json::to_value).collect()),
            // Inserted in order, so a repeated key ends with its last value, as serde_json reads it.
            Node::Object(o) => Value::Object(
                o.0.iter()
                    .map(|(k, v)| (k.clone().into_owned(), v.to_value()))
                    .collect(),
            ),
        }
    }
    fn eq_value(&self, other: &Value) -> bool {
        match (self, other) {
            (Node::Null, Value::Null) => true,
            (Node::Bool(a), Value::Bool(b)) => a == b,
            (Node::Number(a), Value::Number(b)) => a == b,
            (Node::String(a), Value::String(b)) => a == b,
            (Node::Array(a), Value::Array(b)) => {
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.eq_value(y))
            }
            (Node::Object(a), Value::Object(b)) => a.eq_map(b),
            _ => false,
        }
    }
}

impl<'a> Members for Object<'a> {
    type Item = Node<'a>;

    fn get(&self, key: &str) -> Option<&Node<'a>> {
        self.0.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v)
    }
    fn entries(&self) -> impl Iterator<Item = (&str, &Node<'a>)> {
        self.0.iter().map(|(k, v)| (k.as_ref(), v))
    }
    fn eq_map(&self, other: &Map<String, Value>) -> bool {
        // Same distinct keys, each with the last value written equal to the other's.
        other
            .iter()
            .all(|(k, v)| self.get(k).is_some_and(|mine| mine.eq_value(v)))
            && self.distinct_keys() == other.len()
    }
}

impl Object<'_> {
    /// How many different keys the object has. Objects are short (labels, a selector); a long
    /// one is counted through a set so that a hostile object costs linear time, not quadratic.
    fn distinct_keys(&self) -> usize {
        if self.0.len() <= 16 {
            self.0
                .iter()
                .enumerate()
                .filter(|(i, (k, _))| !self.0.iter().skip(i + 1).any(|(later, _)| later == k))
                .count()
        } else {
            self.0
                .iter()
                .map(|(k, _)| k.as_ref())
                .collect::<std::collections::HashSet<&str>>()
                .len()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn s(text: &str) -> Node<'_> {
        Node::String(Cow::Borrowed(text))
    }

    fn object<'a>(members: &[(&'a str, Node<'a>)]) -> Node<'a> {
        Node::Object(Object(
            members
                .iter()
                .map(|(k, v)| (Cow::Borrowed(*k), v.clone()))
                .collect(),
        ))
    }

    #[test]
    fn a_key_written_twice_reads_as_serde_json_reads_it_the_last_one() {
        let node = object(&[("a", s("first")), ("b", Node::Null), ("a", s("last"))]);
        assert_eq!(node.get("a").and_then(Json::as_str), Some("last"));
        assert_eq!(node.to_value(), json!({"a": "last", "b": null}));
        assert!(node.eq_value(&json!({"a": "last", "b": null})));
        assert!(!node.eq_value(&json!({"a": "first", "b": null})));
        // Two distinct keys, not three.
        assert!(!node.eq_value(&json!({"a": "last", "b": null, "c": 1})));
        assert!(!node.eq_value(&json!({"a": "last"})));
    }

    #[test]
    fn a_long_object_counts_its_distinct_keys_as_a_short_one_does() {
        let keys: Vec<String> = (0..40).map(|i| format!("k{}", i % 20)).collect();
        let members: Vec<(&str, Node<'_>)> = keys.iter().map(|k| (k.as_str(), s("v"))).collect();
        let node = object(&members);
        let want: Map<String, Value> = (0..20).map(|i| (format!("k{i}"), json!("v"))).collect();
        assert!(node.eq_value(&Value::Object(want.clone())));
        let mut fewer = want.clone();
        fewer.remove("k3");
        assert!(!node.eq_value(&Value::Object(fewer)));
        // The last of a repeated key counts, in a long object too.
        let mut members = members;
        members.push(("k3", s("w")));
        let mut changed = want;
        changed.insert("k3".into(), json!("w"));
        assert!(object(&members).eq_value(&Value::Object(changed)));
    }

    #[test]
    fn scalars_and_lists_compare_as_values_do() {
        let list = Node::Array(vec![
            Node::Bool(true),
            Node::Number(1.into()),
            s("x"),
            Node::Null,
        ]);
        assert!(list.eq_value(&json!([true, 1, "x", null])));
        assert!(!list.eq_value(&json!([true, 1, "x"])));
        assert!(!list.eq_value(&json!([true, 1.5, "x", null])));
        assert!(!Node::Number(1.into()).eq_value(&json!("1")));
        assert_eq!(list.to_value(), json!([true, 1, "x", null]));
        assert_eq!(list.as_array().map(<[Node<'_>]>::len), Some(4));
        assert_eq!(Node::Number((-3).into()).as_i64(), Some(-3));
        assert!(Node::Null.is_null() && s("x").get("a").is_none());
    }
}

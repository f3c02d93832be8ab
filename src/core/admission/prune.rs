//! Reads only what the rules read: a `Deserialize` seed that builds the paths a [`Keep`] names
//! into a [`Value`] and skips the rest without allocating.
//!
//! Pure. `managedFields`, `status`, ports and the like are skipped unbuilt, so a review costs
//! about what the rules read, not what the object holds. What is kept is
//! [`crate::core::mutate::READS`], beside the rules that read it.

use serde::Deserialize;
use serde_json::Value;

use crate::{
    core::mutate::{CONTAINER_READS, READS},
    k8s::OUTPOST_TYPE,
};

/// Which parts of a JSON document to build; the rest is skipped without allocating.
#[derive(Debug, Clone, Copy)]
pub enum Keep {
    /// The whole value.
    All,
    /// Of an object, these members (each pruned in turn); others are skipped.
    Keys(&'static [(&'static str, Keep)]),
    /// Of an array, every element, pruned.
    Each(&'static Keep),
    /// The object's labels, kept whole; the outpost type is noted for [`Keep::Containers`].
    Labels,
    /// The pod's containers. Every name is kept; the rest of a container only when it may be
    /// the outpost container: the first one, or one named after the outpost type. When the
    /// type is not known yet (labels after spec, which the apiserver never writes), or a
    /// container does not start with its name, everything is kept.
    Containers,
}

pub(super) fn object<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    struct Opt;
    impl<'de> serde::de::Visitor<'de> for Opt {
        type Value = Option<Value>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an object or null")
        }
        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            let cx = Cx::default();
            serde::de::DeserializeSeed::deserialize(
                Pruned {
                    keep: READS,
                    cx: &cx,
                },
                d,
            )
            .map(Some)
        }
    }
    d.deserialize_option(Opt)
}

/// What pruning has learnt so far in one object.
#[derive(Debug, Default)]
struct Cx {
    outpost_type: std::cell::RefCell<Option<String>>,
}

/// Deserializes a [`Value`], building only what `keep` asks for.
#[derive(Clone, Copy)]
struct Pruned<'c> {
    keep: Keep,
    cx: &'c Cx,
}

impl<'de> serde::de::DeserializeSeed<'de> for Pruned<'_> {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        match self.keep {
            Keep::All => Value::deserialize(d),
            Keep::Labels => {
                let labels = Value::deserialize(d)?;
                if let Some(t) = labels.get(OUTPOST_TYPE).and_then(Value::as_str) {
                    *self.cx.outpost_type.borrow_mut() = Some(t.to_owned());
                }
                Ok(labels)
            }
            _ => d.deserialize_any(PrunedVisitor(self)),
        }
    }
}

struct PrunedVisitor<'c>(Pruned<'c>);

/// The scalar arms of a visitor that builds a [`Value`]: each scalar as `serde_json` would.
macro_rules! scalars_as_values {
    () => {
        fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
            Ok(Value::Bool(v))
        }
        fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
            Ok(Value::from(v))
        }
        fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
            Ok(Value::from(v))
        }
        fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
            Ok(Value::from(v))
        }
        fn visit_str<E>(self, v: &str) -> Result<Value, E> {
            Ok(Value::from(v))
        }
        fn visit_string<E>(self, v: String) -> Result<Value, E> {
            Ok(Value::String(v))
        }
        fn visit_unit<E>(self) -> Result<Value, E> {
            Ok(Value::Null)
        }
        fn visit_none<E>(self) -> Result<Value, E> {
            Ok(Value::Null)
        }
    };
}

/// One container: its fields as [`CONTAINER_READS`] says, or only its name when it cannot be the
/// outpost container.
struct ContainerSeed<'c> {
    first: bool,
    cx: &'c Cx,
}

impl<'de> serde::de::DeserializeSeed<'de> for ContainerSeed<'_> {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for ContainerSeed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a container")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let Keep::Keys(keys) = CONTAINER_READS else {
            return Value::deserialize(serde::de::value::MapAccessDeserializer::new(map));
        };
        let mut out = serde_json::Map::new();
        let mut whole = self.first || self.cx.outpost_type.borrow().is_none();
        let mut seen_first_key = false;
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            if !seen_first_key {
                seen_first_key = true;
                whole |= key != "name";
            }
            if key == "name" {
                let name: Value = map.next_value()?;
                whole |= name.as_str() == self.cx.outpost_type.borrow().as_deref();
                out.insert("name".into(), name);
            } else if whole && keys.iter().any(|(k, _)| *k == key) {
                out.insert(key.into_owned(), map.next_value()?);
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(Value::Object(out))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Value, A::Error> {
        Value::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
    }

    scalars_as_values!();
}

/// A map key, borrowed from the input unless it had escapes.
struct Key<'de>(std::borrow::Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> serde::de::Visitor<'de> for PrunedVisitor<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let Keep::Keys(keys) = self.0.keep else {
            return Value::deserialize(serde::de::value::MapAccessDeserializer::new(map));
        };
        let mut out = serde_json::Map::new();
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            match keys.iter().find(|(k, _)| *k == key) {
                // A second copy of a member the rules read could disagree with the first about
                // which outpost this is; the apiserver never writes one, so refuse it.
                Some(_) if out.contains_key(key.as_ref()) => {
                    return Err(serde::de::Error::custom(format_args!(
                        "duplicate key `{key}` in the object"
                    )));
                }
                Some((_, keep)) => {
                    let value = map.next_value_seed(Pruned {
                        keep: *keep,
                        cx: self.0.cx,
                    })?;
                    out.insert(key.into_owned(), value);
                }
                None => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(Value::Object(out))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let cx = self.0.cx;
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        match self.0.keep {
            Keep::Each(keep) => {
                while let Some(v) = seq.next_element_seed(Pruned { keep: *keep, cx })? {
                    out.push(v);
                }
            }
            Keep::Containers => {
                while let Some(v) = seq.next_element_seed(ContainerSeed {
                    first: out.is_empty(),
                    cx,
                })? {
                    out.push(v);
                }
            }
            _ => return Value::deserialize(serde::de::value::SeqAccessDeserializer::new(seq)),
        }
        Ok(Value::Array(out))
    }

    // Anything that is not the object or array `Keep` expected is kept as it is, so the core
    // sees what it would have seen in the whole document.
    scalars_as_values!();
}

//! Reads only what the rules read: a `Deserialize` seed that builds the paths a [`Keep`] names
//! into a [`Value`] and skips the rest without allocating.
//!
//! Pure. `managedFields`, `status`, ports and the like are skipped unbuilt, so a review costs
//! about what the rules read, not what the object holds. What is kept is
//! [`crate::core::mutate::READS`], beside the rules that read it.
//!
//! What is kept is bounded too: at most [`MAX_KEPT_VALUES`] values are built from one object,
//! whatever the body holds. A 6 MB `env` array in the outpost container would otherwise become a
//! tree of about 13 times its size; past the cap the object is not built (only the first
//! [`MAX_KEPT_VALUES`] values ever were), and the review is answered allowed, unpatched, with a
//! warning: a 4xx would make the apiserver refuse the write under `failurePolicy: Fail`.

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

/// The most JSON values (objects, arrays, scalars, each counted once) built from one object. An
/// outpost Service or Deployment has a few hundred in the fields the rules read; each costs at
/// most about 700 bytes beyond its strings (a one-member object is a `BTreeMap` leaf), so one
/// parse builds at most about 1.4 MiB of nodes.
pub const MAX_KEPT_VALUES: usize = 2048;

/// The parse error past [`MAX_KEPT_VALUES`]; `parse` reads the envelope again without the object.
pub(super) const TOO_MANY_VALUES: &str = "the object has more than 2048 values in the fields the \
     webhook reads (labels, selectors, containers, env, volumes)";

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

/// What pruning has learnt so far in one object, and how many values it has built.
#[derive(Debug, Default)]
struct Cx {
    outpost_type: std::cell::RefCell<Option<String>>,
    kept: std::cell::Cell<usize>,
}

impl Cx {
    /// Counts one more value built; an error once past [`MAX_KEPT_VALUES`].
    fn keep<E: serde::de::Error>(&self) -> Result<(), E> {
        let kept = self.kept.get() + 1;
        self.kept.set(kept);
        if kept > MAX_KEPT_VALUES {
            return Err(E::custom(TOO_MANY_VALUES));
        }
        Ok(())
    }
}

/// Builds a whole [`Value`], counting every value against [`MAX_KEPT_VALUES`].
#[derive(Clone, Copy)]
struct Counted<'c>(&'c Cx);

impl<'de> serde::de::DeserializeSeed<'de> for Counted<'_> {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Counted<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.0.keep()?;
        let mut out = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value_seed(self)?;
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.0.keep()?;
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(self)? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Value, E> {
        self.0.keep()?;
        Ok(Value::Bool(v))
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Value, E> {
        self.0.keep()?;
        Ok(Value::from(v))
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Value, E> {
        self.0.keep()?;
        Ok(Value::from(v))
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Value, E> {
        self.0.keep()?;
        Ok(Value::from(v))
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Value, E> {
        self.0.keep()?;
        Ok(Value::from(v))
    }
    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Value, E> {
        self.0.keep()?;
        Ok(Value::String(v))
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<Value, E> {
        self.0.keep()?;
        Ok(Value::Null)
    }
    fn visit_none<E: serde::de::Error>(self) -> Result<Value, E> {
        self.0.keep()?;
        Ok(Value::Null)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
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
            Keep::All => Counted(self.cx).deserialize(d),
            Keep::Labels => {
                let labels = Counted(self.cx).deserialize(d)?;
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

/// The scalar arms of a visitor that builds a [`Value`]: each scalar as `serde_json` would,
/// counted.
macro_rules! scalars_as_values {
    () => {
        fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Value, E> {
            Counted(self.cx()).visit_bool(v)
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Value, E> {
            Counted(self.cx()).visit_i64(v)
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Value, E> {
            Counted(self.cx()).visit_u64(v)
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Value, E> {
            Counted(self.cx()).visit_f64(v)
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Value, E> {
            Counted(self.cx()).visit_str(v)
        }
        fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Value, E> {
            Counted(self.cx()).visit_string(v)
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Value, E> {
            Counted(self.cx()).visit_unit()
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Value, E> {
            Counted(self.cx()).visit_none()
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
            return Counted(self.cx).visit_map(map);
        };
        self.cx.keep()?;
        let mut out = serde_json::Map::new();
        let mut whole = self.first || self.cx.outpost_type.borrow().is_none();
        let mut seen_first_key = false;
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            if !seen_first_key {
                seen_first_key = true;
                whole |= key != "name";
            }
            if key == "name" {
                let name: Value = map.next_value_seed(Counted(self.cx))?;
                whole |= name.as_str() == self.cx.outpost_type.borrow().as_deref();
                out.insert("name".into(), name);
            } else if whole && keys.iter().any(|(k, _)| *k == key) {
                out.insert(key.into_owned(), map.next_value_seed(Counted(self.cx))?);
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(Value::Object(out))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Value, A::Error> {
        Counted(self.cx).visit_seq(seq)
    }

    scalars_as_values!();
}

impl<'c> ContainerSeed<'c> {
    fn cx(&self) -> &'c Cx {
        self.cx
    }
}

impl<'c> PrunedVisitor<'c> {
    fn cx(&self) -> &'c Cx {
        self.0.cx
    }
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
            return Counted(self.0.cx).visit_map(map);
        };
        self.0.cx.keep()?;
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
        if !matches!(self.0.keep, Keep::Each(_) | Keep::Containers) {
            return Counted(cx).visit_seq(seq);
        }
        cx.keep()?;
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
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
            _ => {}
        }
        Ok(Value::Array(out))
    }

    // Anything that is not the object or array `Keep` expected is kept as it is, so the core
    // sees what it would have seen in the whole document.
    scalars_as_values!();
}

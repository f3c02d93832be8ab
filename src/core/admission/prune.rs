//! Reads only what the rules read: a `Deserialize` seed that builds the paths a [`Keep`] names
//! into a [`Node`] borrowed from the body and skips the rest without allocating.
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

use std::borrow::Cow;

use serde::Deserialize;

use crate::{
    core::{
        mutate::{CONTAINER_READS, READS},
        tree::{Json as _, Members as _, Node, Object},
    },
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
/// most 56 bytes beyond its strings (a member: its key and its [`Node`]), and strings are
/// borrowed from the body unless they hold escapes, so one parse builds little beyond the body.
pub const MAX_KEPT_VALUES: usize = 2048;

/// The parse error past [`MAX_KEPT_VALUES`]; `parse` reads the envelope again without the object.
pub(super) const TOO_MANY_VALUES: &str = "the object has more than 2048 values in the fields the \
     webhook reads (labels, selectors, containers, env, volumes)";

pub(super) fn object<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Node<'de>>, D::Error> {
    struct Opt;
    impl<'de> serde::de::Visitor<'de> for Opt {
        type Value = Option<Node<'de>>;
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
#[derive(Default)]
struct Cx<'de> {
    outpost_type: std::cell::RefCell<Option<String>>,
    kept: std::cell::Cell<usize>,
    /// The members and items of the objects and arrays being read, innermost last: each is
    /// moved into a vector of its exact size when it ends, rather than grown as it is read.
    members: std::cell::Cell<Vec<(Cow<'de, str>, Node<'de>)>>,
    items: std::cell::Cell<Vec<Node<'de>>>,
}

/// Pushes onto one of [`Cx`]'s stacks, or moves the top of it from `start` out. Taken out of its
/// cell and put back: no borrow is ever held while the parser reads on.
fn push<T>(stack: &std::cell::Cell<Vec<T>>, value: T) {
    let mut all = stack.take();
    all.push(value);
    stack.set(all);
}

fn depth<T>(stack: &std::cell::Cell<Vec<T>>) -> usize {
    let all = stack.take();
    let len = all.len();
    stack.set(all);
    len
}

fn pop_from<T>(stack: &std::cell::Cell<Vec<T>>, start: usize) -> Vec<T> {
    let mut all = stack.take();
    let top = all.split_off(start.min(all.len()));
    stack.set(all);
    top
}

impl Cx<'_> {
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

/// Builds a whole [`Node`], counting every value against [`MAX_KEPT_VALUES`].
#[derive(Clone, Copy)]
struct Counted<'c, 'de>(&'c Cx<'de>);

impl<'de> serde::de::DeserializeSeed<'de> for Counted<'_, 'de> {
    type Value = Node<'de>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Node<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Counted<'_, 'de> {
    type Value = Node<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Node<'de>, A::Error> {
        self.0.keep()?;
        let start = depth(&self.0.members);
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            let value = map.next_value_seed(self)?;
            push(&self.0.members, (key, value));
        }
        Ok(Node::Object(Object(pop_from(&self.0.members, start))))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Node<'de>, A::Error> {
        self.0.keep()?;
        let start = depth(&self.0.items);
        while let Some(v) = seq.next_element_seed(self)? {
            push(&self.0.items, v);
        }
        Ok(Node::Array(pop_from(&self.0.items, start)))
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Node<'de>, E> {
        self.0.keep()?;
        Ok(Node::Bool(v))
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Node<'de>, E> {
        self.0.keep()?;
        Ok(Node::Number(v.into()))
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Node<'de>, E> {
        self.0.keep()?;
        Ok(Node::Number(v.into()))
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Node<'de>, E> {
        self.0.keep()?;
        // As serde_json's `Value`: a float JSON cannot hold (it never parses one) is null.
        Ok(serde_json::Number::from_f64(v).map_or(Node::Null, Node::Number))
    }
    fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Node<'de>, E> {
        self.0.keep()?;
        Ok(Node::String(Cow::Borrowed(v)))
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Node<'de>, E> {
        self.0.keep()?;
        Ok(Node::String(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Node<'de>, E> {
        self.0.keep()?;
        Ok(Node::String(Cow::Owned(v)))
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<Node<'de>, E> {
        self.0.keep()?;
        Ok(Node::Null)
    }
    fn visit_none<E: serde::de::Error>(self) -> Result<Node<'de>, E> {
        self.0.keep()?;
        Ok(Node::Null)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Node<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

/// Deserializes a [`Node`], building only what `keep` asks for.
#[derive(Clone, Copy)]
struct Pruned<'c, 'de> {
    keep: Keep,
    cx: &'c Cx<'de>,
}

impl<'de> serde::de::DeserializeSeed<'de> for Pruned<'_, 'de> {
    type Value = Node<'de>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Node<'de>, D::Error> {
        match self.keep {
            Keep::All => Counted(self.cx).deserialize(d),
            Keep::Labels => {
                let labels = Counted(self.cx).deserialize(d)?;
                if let Some(t) = labels.get(OUTPOST_TYPE).and_then(|t| t.as_str()) {
                    *self.cx.outpost_type.borrow_mut() = Some(t.to_owned());
                }
                Ok(labels)
            }
            _ => d.deserialize_any(PrunedVisitor(self)),
        }
    }
}

struct PrunedVisitor<'c, 'de>(Pruned<'c, 'de>);

/// The scalar arms of a visitor that builds a [`Node`]: each scalar as `serde_json` would,
/// counted.
macro_rules! scalars_as_nodes {
    () => {
        fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Node<'de>, E> {
            Counted(self.cx()).visit_bool(v)
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Node<'de>, E> {
            Counted(self.cx()).visit_i64(v)
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Node<'de>, E> {
            Counted(self.cx()).visit_u64(v)
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Node<'de>, E> {
            Counted(self.cx()).visit_f64(v)
        }
        fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Node<'de>, E> {
            Counted(self.cx()).visit_borrowed_str(v)
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Node<'de>, E> {
            Counted(self.cx()).visit_str(v)
        }
        fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Node<'de>, E> {
            Counted(self.cx()).visit_string(v)
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Node<'de>, E> {
            Counted(self.cx()).visit_unit()
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Node<'de>, E> {
            Counted(self.cx()).visit_none()
        }
    };
}

/// One container: its fields as [`CONTAINER_READS`] says, or only its name when it cannot be the
/// outpost container.
struct ContainerSeed<'c, 'de> {
    first: bool,
    cx: &'c Cx<'de>,
}

impl<'de> serde::de::DeserializeSeed<'de> for ContainerSeed<'_, 'de> {
    type Value = Node<'de>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Node<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for ContainerSeed<'_, 'de> {
    type Value = Node<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a container")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Node<'de>, A::Error> {
        let Keep::Keys(keys) = CONTAINER_READS else {
            return Counted(self.cx).visit_map(map);
        };
        self.cx.keep()?;
        let mut out = Vec::with_capacity(keys.len());
        let mut whole = self.first || self.cx.outpost_type.borrow().is_none();
        let mut seen_first_key = false;
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            if !seen_first_key {
                seen_first_key = true;
                whole |= key != "name";
            }
            if key == "name" {
                // Which container is the outpost's is told by its name, and the fields before a
                // second name would already have been skipped; the apiserver never writes one.
                if out.iter().any(|(k, _)| k == "name") {
                    return Err(serde::de::Error::custom(
                        "duplicate key `name` in a container",
                    ));
                }
                let name = map.next_value_seed(Counted(self.cx))?;
                whole |= name.as_str() == self.cx.outpost_type.borrow().as_deref();
                out.push((key, name));
            } else if whole && keys.iter().any(|(k, _)| *k == key) {
                let value = map.next_value_seed(Counted(self.cx))?;
                out.push((key, value));
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(Node::Object(Object(out)))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Node<'de>, A::Error> {
        Counted(self.cx).visit_seq(seq)
    }

    scalars_as_nodes!();
}

impl<'c, 'de> ContainerSeed<'c, 'de> {
    fn cx(&self) -> &'c Cx<'de> {
        self.cx
    }
}

impl<'c, 'de> PrunedVisitor<'c, 'de> {
    fn cx(&self) -> &'c Cx<'de> {
        self.0.cx
    }
}

/// A map key, borrowed from the input unless it had escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> serde::de::Visitor<'de> for PrunedVisitor<'_, 'de> {
    type Value = Node<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Node<'de>, A::Error> {
        let Keep::Keys(keys) = self.0.keep else {
            return Counted(self.0.cx).visit_map(map);
        };
        self.0.cx.keep()?;
        let mut out = Object(Vec::with_capacity(keys.len()));
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            match keys.iter().find(|(k, _)| *k == key) {
                // A second copy of a member the rules read could disagree with the first about
                // which outpost this is; the apiserver never writes one, so refuse it.
                Some(_) if out.contains_key(&key) => {
                    return Err(serde::de::Error::custom(format_args!(
                        "duplicate key `{key}` in the object"
                    )));
                }
                Some((_, keep)) => {
                    let value = map.next_value_seed(Pruned {
                        keep: *keep,
                        cx: self.0.cx,
                    })?;
                    out.0.push((key, value));
                }
                None => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(Node::Object(out))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Node<'de>, A::Error> {
        let cx = self.0.cx;
        if !matches!(self.0.keep, Keep::Each(_) | Keep::Containers) {
            return Counted(cx).visit_seq(seq);
        }
        cx.keep()?;
        let start = depth(&cx.items);
        match self.0.keep {
            Keep::Each(keep) => {
                while let Some(v) = seq.next_element_seed(Pruned { keep: *keep, cx })? {
                    push(&cx.items, v);
                }
            }
            Keep::Containers => {
                let mut first = true;
                while let Some(v) = seq.next_element_seed(ContainerSeed { first, cx })? {
                    first = false;
                    push(&cx.items, v);
                }
            }
            _ => {}
        }
        Ok(Node::Array(pop_from(&cx.items, start)))
    }

    // Anything that is not the object or array `Keep` expected is kept as it is, so the core
    // sees what it would have seen in the whole document.
    scalars_as_nodes!();
}

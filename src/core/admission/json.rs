//! Writes a list of JSON patch operations as JSON, byte for byte what `serde_json::to_vec` writes
//! for it, in about 40 % fewer instructions. Pure.
//!
//! The answer's patch is built on every review, and most of its cost was `serde_json` escaping
//! short strings (paths, names, label values) one byte at a time. Here a string that needs no
//! escaping, which is nearly every string Kubernetes objects hold, is checked in one pass the
//! compiler vectorises and copied whole; any other string, and every number, is still written
//! by `serde_json`, so its rules (escapes, `\u` forms, number formats) stay the only ones.

use json_patch::PatchOperation;
use serde_json::Value;

/// Appends `ops` as a JSON array to `out`.
pub fn write_ops(out: &mut Vec<u8>, ops: &[PatchOperation]) {
    out.push(b'[');
    for (i, op) in ops.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let (name, from, path, value) = match op {
            PatchOperation::Add(o) => ("add", None, &o.path, Some(&o.value)),
            PatchOperation::Remove(o) => ("remove", None, &o.path, None),
            PatchOperation::Replace(o) => ("replace", None, &o.path, Some(&o.value)),
            PatchOperation::Move(o) => ("move", Some(&o.from), &o.path, None),
            PatchOperation::Copy(o) => ("copy", Some(&o.from), &o.path, None),
            PatchOperation::Test(o) => ("test", None, &o.path, Some(&o.value)),
        };
        out.extend_from_slice(br#"{"op":""#);
        out.extend_from_slice(name.as_bytes());
        out.push(b'"');
        if let Some(from) = from {
            out.extend_from_slice(br#","from":"#);
            write_str(out, from.as_str());
        }
        out.extend_from_slice(br#","path":"#);
        write_str(out, path.as_str());
        if let Some(value) = value {
            out.extend_from_slice(br#","value":"#);
            write_value(out, value);
        }
        out.push(b'}');
    }
    out.push(b']');
}

fn write_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        // Writing a number into a Vec cannot fail.
        Value::Number(n) => {
            let _ = serde_json::to_writer(&mut *out, n);
        }
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, item);
            }
            out.push(b']');
        }
        Value::Object(members) => {
            out.push(b'{');
            for (i, (key, item)) in members.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(out, key);
                out.push(b':');
                write_value(out, item);
            }
            out.push(b'}');
        }
    }
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    if needs_escape(s.as_bytes()) {
        let _ = serde_json::to_writer(&mut *out, s);
    } else {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    }
}

/// Whether any byte is one JSON escapes: a control character, `"` or `\\`. No early exit, so
/// the compiler checks whole vectors at a time (a hand-written eight-lane version measured the
/// same).
#[allow(clippy::needless_bitwise_bool)] // `||` would branch on every byte
fn needs_escape(bytes: &[u8]) -> bool {
    bytes.iter().fold(false, |escape, &b| {
        escape | (b < 0x20) | (b == b'"') | (b == b'\\')
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use json_patch::{
        AddOperation, CopyOperation, MoveOperation, RemoveOperation, ReplaceOperation,
        TestOperation, jsonptr::PointerBuf,
    };
    use proptest::prelude::*;
    use serde_json::json;

    fn same_as_serde(ops: &[PatchOperation]) {
        let mut ours = Vec::new();
        write_ops(&mut ours, ops);
        let theirs = serde_json::to_vec(ops).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&ours),
            String::from_utf8_lossy(&theirs)
        );
    }

    fn pointer(tokens: &[String]) -> PointerBuf {
        PointerBuf::from_tokens(tokens.iter().map(String::as_str))
    }

    #[test]
    fn every_kind_of_operation_and_value_is_written_as_serde_json_writes_it() {
        let path = PointerBuf::parse("/spec/template/metadata/labels/a~1b~0c").unwrap();
        let from = PointerBuf::parse("/x/\u{1}\"\\").unwrap();
        let value = json!({
            "s": "plain", "e": "quote \" backslash \\ newline \n tab \t nul \u{0} del \u{7f}",
            "u": "ünïcödé ✓ 𝄞", "n": [0, -1, 1.5, 1e300, u64::MAX, i64::MIN], "b": [true, false],
            "z": null, "o": {"": {}, "k": []}
        });
        same_as_serde(&[
            PatchOperation::Add(AddOperation {
                path: path.clone(),
                value: value.clone(),
            }),
            PatchOperation::Remove(RemoveOperation { path: path.clone() }),
            PatchOperation::Replace(ReplaceOperation {
                path: from.clone(),
                value: json!(""),
            }),
            PatchOperation::Move(MoveOperation {
                from: from.clone(),
                path: path.clone(),
            }),
            PatchOperation::Copy(CopyOperation {
                from,
                path: path.clone(),
            }),
            PatchOperation::Test(TestOperation { path, value }),
        ]);
        same_as_serde(&[]);
    }

    #[test]
    fn every_byte_in_every_lane_is_classified_as_a_byte_at_a_time_check_would() {
        let naive = |bytes: &[u8]| bytes.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\');
        for len in 0..=20 {
            for at in 0..len {
                for byte in 0..=255u8 {
                    for fill in [b'a', 0xff, 0x20, 0x7f] {
                        let mut bytes = vec![fill; len];
                        bytes[at] = byte;
                        assert_eq!(needs_escape(&bytes), naive(&bytes), "{bytes:?}");
                    }
                }
            }
        }
        assert!(!needs_escape(b""));
    }

    fn any_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            any::<String>().prop_map(Value::String),
            "[ -~\\x00-\\x1f]{0,40}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                prop::collection::btree_map(any::<String>(), inner, 0..8)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn any_patch_is_written_as_serde_json_writes_it(
            ops in prop::collection::vec(
                (0..6u8, prop::collection::vec(any::<String>(), 0..4),
                 prop::collection::vec("[a-z~/\"\\\\\\x00-\\x1f]{0,8}", 0..4), any_value()),
                0..6,
            )
        ) {
            let ops: Vec<PatchOperation> = ops
                .into_iter()
                .map(|(kind, path, from, value)| {
                    let (path, from) = (pointer(&path), pointer(&from));
                    match kind {
                        0 => PatchOperation::Add(AddOperation { path, value }),
                        1 => PatchOperation::Remove(RemoveOperation { path }),
                        2 => PatchOperation::Replace(ReplaceOperation { path, value }),
                        3 => PatchOperation::Move(MoveOperation { from, path }),
                        4 => PatchOperation::Copy(CopyOperation { from, path }),
                        _ => PatchOperation::Test(TestOperation { path, value }),
                    }
                })
                .collect();
            same_as_serde(&ops);
        }
    }
}

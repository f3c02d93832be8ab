//! Kubernetes facts the whole crate shares: the labels authentik's controller writes, and the
//! apiserver's rules for label keys and values. Pure.

/// The label that marks objects written by authentik's outpost controller.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Its value.
pub const MANAGED_BY_AUTHENTIK: &str = "goauthentik.io";
/// The three labels that identify an outpost.
pub const OUTPOST_NAME: &str = "goauthentik.io/outpost-name";
pub const OUTPOST_TYPE: &str = "goauthentik.io/outpost-type";
pub const OUTPOST_UUID: &str = "goauthentik.io/outpost-uuid";
/// The values authentik writes in [`OUTPOST_TYPE`]: its `OutpostType` enum.
pub const OUTPOST_TYPES: [&str; 4] = ["proxy", "ldap", "radius", "rac"];

/// The selector authentik's controller gives an embedded outpost's Service: the authentik server
/// pods, which run the embedded outpost on a default install.
pub const EMBEDDED_SELECTOR: [(&str, &str); 2] = [
    ("app.kubernetes.io/name", "authentik"),
    ("app.kubernetes.io/component", "server"),
];

/// On a Service whose selector the webhook rewrote: the selector it had, as JSON, so that it can
/// be restored exactly when the standalone Deployment goes away.
pub const ORIGINAL_SELECTOR: &str = "outpost-webhook/original-selector";

/// On an outpost's pod template: the digest of the Secret data its injected env and volumes read.
/// The reconciler sets it when the data changes, which rolls the pods.
pub const SECRET_CHECKSUM: &str = "outpost-webhook/secret-checksum";

/// Pod labels that authentik's controller puts in a Deployment's immutable `spec.selector`.
/// A policy must not set them: a template that stops matching its selector is rejected (422).
pub const SELECTOR_LABELS: [&str; 5] = [
    "app.kubernetes.io/name",
    "app.kubernetes.io/managed-by",
    "goauthentik.io/outpost-name",
    "goauthentik.io/outpost-type",
    "goauthentik.io/outpost-uuid",
];

/// A Kubernetes label or annotation key: `[prefix/]name`.
#[must_use]
pub fn valid_qualified_name(key: &str) -> bool {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|part| {
                !part.is_empty()
                    && part.len() <= 63
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            })
    });
    prefix_ok && !name.is_empty() && valid_label_value(name)
}

/// A DNS-1123 subdomain, as the names of most objects (a Secret's) must be: at most 253 of
/// `[a-z0-9-.]`, each dot-separated part non-empty with alphanumeric ends.
#[must_use]
pub fn valid_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        })
}

/// A Kubernetes label value: empty, or 1-63 of `[A-Za-z0-9-_.]` with alphanumeric ends.
#[must_use]
pub fn valid_label_value(v: &str) -> bool {
    let alnum = |c: Option<u8>| c.is_some_and(|b| b.is_ascii_alphanumeric());
    v.is_empty()
        || (v.len() <= 63
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && alnum(v.bytes().next())
            && alnum(v.bytes().last()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qualified_names() {
        for ok in ["a", "app.kubernetes.io/component", "x.y/z_1", "A.b-c"] {
            assert!(valid_qualified_name(ok), "{ok}");
        }
        for bad in [
            "",
            "/a",
            "a/",
            "-a",
            "a b",
            "UP.case/x",
            "a/b/c",
            &"x".repeat(64),
        ] {
            assert!(!valid_qualified_name(bad), "{bad}");
        }
    }
}

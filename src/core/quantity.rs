//! Kubernetes quantities and "the policy's value is contained in the object's".
//!
//! Pure: no I/O. The apiserver defaults fields after every mutation (a probe's `timeoutSeconds`,
//! a secret volume's `defaultMode`) and stores quantities in canonical form (`2048Mi` becomes
//! `2Gi`), so an exact comparison would re-patch every UPDATE forever.

use serde_json::Value;

use super::tree::{Json, Members as _};

/// Where a string is a Kubernetes quantity, which the apiserver stores in canonical form.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Quantity {
    No,
    /// The values of this map are quantities (`limits`, `requests`).
    Values,
    /// This value is a quantity (`sizeLimit`, `divisor`, or a value under `limits`).
    Yes,
}

/// True when every field of `desired` is in `actual` with an equal value. Fields only `actual`
/// has (apiserver defaults) are allowed; lists must match entry by entry.
#[must_use]
pub(crate) fn covers<J: Json>(actual: &J, desired: &Value, q: Quantity) -> bool {
    match desired {
        Value::Object(want) => {
            if let Some(have) = actual.as_object() {
                return want.iter().all(|(key, w)| {
                    let child = match key.as_str() {
                        "limits" | "requests" => Quantity::Values,
                        "sizeLimit" | "divisor" => Quantity::Yes,
                        _ if q == Quantity::Values => Quantity::Yes,
                        _ => Quantity::No,
                    };
                    match have.get(key) {
                        Some(h) => covers(h, w, child),
                        None => w.is_null(),
                    }
                });
            }
        }
        Value::Array(want) => {
            if let Some(have) = actual.as_array() {
                return want.len() == have.len()
                    && want
                        .iter()
                        .zip(have)
                        .all(|(w, h)| covers(h, w, Quantity::No));
            }
        }
        Value::String(w) if q == Quantity::Yes => {
            if let Some(h) = actual.as_str() {
                return w == h || quantities_equal(w, h);
            }
        }
        _ => {}
    }
    actual.eq_value(desired)
}

/// A quantity as `mantissa * 10^ten * 2^two`, exactly.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Parsed {
    mantissa: i128,
    ten: i32,
    two: i32,
}

pub(crate) fn parse_quantity(s: &str) -> Option<Parsed> {
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '+' | '-')))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    let (negative, digits) = match number.as_bytes().first() {
        Some(b'-') => (true, number.get(1..)?),
        Some(b'+') => (false, number.get(1..)?),
        _ => (false, number),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if int.is_empty() && frac.is_empty() || int.len() + frac.len() > 30 {
        return None;
    }
    let mut mantissa: i128 = 0;
    for b in int.bytes().chain(frac.bytes()) {
        if !b.is_ascii_digit() {
            return None;
        }
        mantissa = mantissa * 10 + i128::from(b - b'0');
    }
    if negative {
        mantissa = -mantissa;
    }
    let mut ten = -i32::try_from(frac.len()).ok()?;
    let mut two = 0;
    match suffix {
        "" => {}
        "n" => ten -= 9,
        "u" => ten -= 6,
        "m" => ten -= 3,
        "k" => ten += 3,
        "M" => ten += 6,
        "G" => ten += 9,
        "T" => ten += 12,
        "P" => ten += 15,
        "E" => ten += 18,
        "Ki" => two += 10,
        "Mi" => two += 20,
        "Gi" => two += 30,
        "Ti" => two += 40,
        "Pi" => two += 50,
        "Ei" => two += 60,
        exp => {
            let e = exp.strip_prefix(['e', 'E'])?;
            ten += e.parse::<i32>().ok().filter(|e| e.abs() <= 40)?;
        }
    }
    Some(Parsed { mantissa, ten, two })
}

/// True when `s` is a Kubernetes quantity the apiserver accepts that is not negative, as the
/// apiserver requires of resource requests and limits and of `emptyDir.sizeLimit`.
///
/// The grammar (k8s.io/apimachinery `resource.Quantity`): a signed decimal number (`1`, `1.5`,
/// `.5`, `1.`), then a binary suffix (`Ki` `Mi` `Gi` `Ti` `Pi` `Ei`), a decimal suffix (`n` `u`
/// `m` `k` `M` `G` `T` `P` `E`) or a decimal exponent (`e3`, `E-2`), or nothing.
#[must_use]
pub(crate) fn valid_non_negative_quantity(s: &str) -> bool {
    parse_quantity(s).is_some_and(|p| p.mantissa >= 0)
}

/// Exact numeric equality of two quantities (`2Gi` == `2048Mi`, `0.5` == `500m`).
pub(crate) fn quantities_equal(a: &str, b: &str) -> bool {
    let (Some(a), Some(b)) = (parse_quantity(a), parse_quantity(b)) else {
        return false;
    };
    let scale = |p: &Parsed, ten: i32, two: i32| -> Option<i128> {
        let t = u32::try_from(p.ten - ten).ok()?;
        let w = u32::try_from(p.two - two).ok()?;
        p.mantissa
            .checked_mul(10_i128.checked_pow(t)?)?
            .checked_mul(2_i128.checked_pow(w)?)
    };
    let (ten, two) = (a.ten.min(b.ten), a.two.min(b.two));
    match (scale(&a, ten, two), scale(&b, ten, two)) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn quantities_compare_by_value() {
        for (a, b) in [
            ("2Gi", "2048Mi"),
            ("0.5", "500m"),
            ("1", "1000m"),
            ("1k", "1000"),
            ("1e3", "1k"),
            ("128Mi", "134217728"),
            ("100m", "0.1"),
        ] {
            assert!(quantities_equal(a, b), "{a} == {b}");
        }
        for (a, b) in [
            ("1Gi", "1G"),
            ("1", "2"),
            ("x", "x"),
            ("1.", "2"),
            ("", "0"),
        ] {
            assert!(!quantities_equal(a, b), "{a} != {b}");
        }
    }

    #[test]
    fn quantity_grammar_is_the_apiservers() {
        for ok in [
            "2Gi",
            "500m",
            "1e3",
            "1E-2",
            "0.5",
            ".5",
            "1.",
            "+1",
            "128974848",
            "129e6",
            "129M",
            "123Mi",
            "100n",
            "1u",
            "0",
        ] {
            assert!(valid_non_negative_quantity(ok), "{ok}");
        }
        for bad in [
            "2Gib", "2gi", "2GB", "1ki", "Gi", "", " 1", "1 ", "1.2.3", "-1", "-500m", "e3", "1e",
            "1e3Gi", "0x10", "1,5",
        ] {
            assert!(!valid_non_negative_quantity(bad), "{bad}");
        }
    }

    #[test]
    fn covers_allows_apiserver_defaults_but_not_different_values() {
        let want = json!({"httpGet": {"path": "/p", "port": 9000}, "periodSeconds": 3});
        let defaulted = json!({"httpGet": {"path": "/p", "port": 9000, "scheme": "HTTP"},
            "periodSeconds": 3, "timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3});
        assert!(covers(&defaulted, &want, Quantity::No));
        let changed = json!({"httpGet": {"path": "/p", "port": 9001}, "periodSeconds": 3});
        assert!(!covers(&changed, &want, Quantity::No));
        let res = json!({"limits": {"memory": "2560Mi"}, "requests": {"cpu": "0.1"}});
        let stored = json!({"limits": {"memory": "2560Mi"}, "requests": {"cpu": "100m"}});
        assert!(covers(&stored, &res, Quantity::No));
        // An env value is not a quantity, even if it looks like one.
        assert!(!covers(
            &json!({"name": "A", "value": "1000m"}),
            &json!({"name": "A", "value": "1"}),
            Quantity::No
        ));
    }
}

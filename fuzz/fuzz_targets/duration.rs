//! The Go duration parser (`?timeout=` from the apiserver's query string, and the CLI's duration
//! flags): never a panic, and every answer checked against a reference that parses the same
//! grammar in exact integer nanoseconds.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use outpost_webhook::duration::parse_go_duration;

/// Nanoseconds per unit.
fn unit_ns(unit: &str) -> Option<u128> {
    Some(match unit {
        "h" => 3_600_000_000_000,
        "m" => 60_000_000_000,
        "s" => 1_000_000_000,
        "ms" => 1_000_000,
        "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
        "ns" => 1,
        _ => return None,
    })
}

/// What the reference makes of a text.
enum Reference {
    /// Not a duration in the grammar `(number unit)+`, where a number is digits with at most one
    /// dot and at least one digit.
    Invalid,
    /// In the grammar: the exact value, truncated to whole nanoseconds (`None` when it is far
    /// beyond any `Duration`), and the number of segments.
    Valid { nanos: Option<u128>, segments: u32 },
}

/// Parses with integers only: no float can round here.
fn reference(s: &str) -> Reference {
    // Far beyond `Duration::MAX` (about 1.8e28 ns) whatever the unit: a digit run is capped
    // here, and a total this large is only "too large".
    const HUGE: u128 = 10u128.pow(30);
    if s.is_empty() {
        return Reference::Invalid;
    }
    let (mut total, mut segments, mut rest) = (Some(0u128), 0u32, s);
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, tail) = rest.split_at(number_len);
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        let (Some(per_unit), false, false) = (
            unit_ns(unit),
            fraction.contains('.'),
            whole.is_empty() && fraction.is_empty(),
        ) else {
            return Reference::Invalid;
        };
        let mut int = 0u128;
        for d in whole.bytes() {
            int = (int * 10 + u128::from(d - b'0')).min(HUGE);
        }
        // Fifteen fraction digits are finer than a nanosecond of an hour.
        let (mut frac, mut scale) = (0u128, 1u128);
        for d in fraction.bytes().take(15) {
            frac = frac * 10 + u128::from(d - b'0');
            scale *= 10;
        }
        let segment = int
            .checked_mul(per_unit)
            .and_then(|n| n.checked_add(frac * per_unit / scale));
        total = total
            .zip(segment)
            .and_then(|(a, b)| a.checked_add(b))
            .filter(|t| *t < HUGE);
        segments += 1;
        rest = next;
    }
    Reference::Valid {
        nanos: total,
        segments,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if s.len() > 4096 {
        return;
    }
    let parsed = parse_go_duration(s);
    let max = Duration::MAX.as_nanos();
    match reference(s) {
        Reference::Invalid => assert_eq!(parsed, None, "{s:?} is not a duration"),
        Reference::Valid { nanos, segments } => {
            // The parser goes through f64: each segment is off by at most a few units in the last
            // place and one nanosecond of rounding; near Duration::MAX either answer is right.
            let slack = |exact: u128| (exact >> 50) + u128::from(segments) * 2 + 1;
            match (nanos, parsed) {
                (Some(exact), Some(d)) => assert!(
                    d.as_nanos().abs_diff(exact) <= slack(exact),
                    "{s:?} is {exact} ns, parsed as {d:?}"
                ),
                (Some(exact), None) => assert!(
                    exact + slack(exact) > max,
                    "{s:?} is {exact} ns, which fits, and was refused"
                ),
                (None, Some(d)) => panic!("{s:?} is beyond any Duration, parsed as {d:?}"),
                (None, None) => {}
            }
        }
    }
    let Some(d) = parsed else {
        return;
    };
    // Two accepted durations written one after the other are their sum (or refused, past
    // Duration::MAX): each segment is read on its own.
    assert_eq!(
        parse_go_duration(&format!("{s}{s}")),
        d.checked_add(d),
        "{s:?} twice"
    );
    // Written back in whole seconds and nanoseconds, it reads as itself, to the nanosecond
    // (f64 holds every whole second below 2^53 exactly).
    if d.as_secs() < 1 << 53 {
        let written = format!("{}s{}ns", d.as_secs(), d.subsec_nanos());
        let again = parse_go_duration(&written).unwrap_or_else(|| panic!("{written:?} refused"));
        assert!(
            again.as_nanos().abs_diff(d.as_nanos()) <= 1,
            "{s:?} is {d:?}, written {written:?}, read back {again:?}"
        );
    }
});

//! Go durations, as the kube-apiserver writes `?timeout=` and as the CLI's flags take them:
//! `10s`, `1m0s`, `500ms`, `1.5s`. Pure.

use std::time::Duration;

/// Parses a Go duration; `None` when the text is not one or does not fit a [`Duration`]. Never
/// panics, whatever the input: the apiserver's query string reaches it.
#[must_use]
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let split = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let (number, tail) = rest.split_at(split);
        let value: f64 = number.parse().ok()?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        let seconds = match unit {
            "h" => value * 3600.0,
            "m" => value * 60.0,
            "s" => value,
            "ms" => value / 1e3,
            // Go accepts the micro sign (U+00B5) and the Greek mu (U+03BC).
            "us" | "\u{b5}s" | "\u{3bc}s" => value / 1e6,
            "ns" => value / 1e9,
            _ => return None,
        };
        total = total.checked_add(Duration::try_from_secs_f64(seconds).ok()?)?;
        rest = next;
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_go_duration("1m0s"), Some(Duration::from_secs(60)));
        assert_eq!(parse_go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_go_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_go_duration(""), None);
        assert_eq!(parse_go_duration("10"), None);
        assert_eq!(parse_go_duration("x"), None);
        assert_eq!(parse_go_duration("1s."), None);
        for micro in ["3us", "3\u{b5}s", "3\u{3bc}s"] {
            assert_eq!(
                parse_go_duration(micro),
                Some(Duration::from_micros(3)),
                "{micro}"
            );
        }
    }

    #[test]
    fn huge_durations_are_refused_not_panicked_on() {
        let huge = "18000000000000000000s18000000000000000000s";
        assert_eq!(parse_go_duration(huge), None);
        assert_eq!(parse_go_duration(&"9".repeat(400)), None);
        assert_eq!(parse_go_duration("1e400s"), None);
    }
}

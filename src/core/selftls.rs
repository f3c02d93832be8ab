//! Self-managed TLS, decided: given what the webhook's TLS Secret holds and what its
//! registration trusts, what the Lease holder does next. Pure: times are Unix seconds given by
//! the caller, and the certificates are already parsed.
//!
//! The Secret holds a CA (`ca.crt`, `ca.key`), the serving certificate it signed (`tls.crt`,
//! `tls.key`), the CAs the registration must trust (`ca-bundle.crt`), and during a CA roll the
//! next CA (`next-ca.crt`, `next-ca.key`). A CA roll takes two steps, so that no request fails:
//! first the next CA joins the bundle (and the registration's caBundle), and only once the
//! registration trusts it is a serving certificate issued from it. A CA leaves the bundle once it
//! has expired.

/// What one certificate in the Secret is, as far as the decision needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cert {
    /// notBefore, Unix seconds.
    pub not_before: i64,
    /// notAfter, Unix seconds.
    pub not_after: i64,
    /// The DER bytes: identity, for bundles.
    pub der: Vec<u8>,
}

/// The Secret, parsed. `None` fields are missing or did not parse (with their key).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Held {
    pub ca: Option<Cert>,
    pub serving: Option<Serving>,
    pub next_ca: Option<Cert>,
    pub bundle: Vec<Cert>,
}

/// The serving certificate and what the decision checks of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Serving {
    pub cert: Cert,
    /// Signed by the CA in `ca.crt`, with `tls.key` its key.
    pub signed_by_ca: bool,
    /// Its DNS names are exactly the Service's.
    pub names_match: bool,
}

/// How long new certificates are valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    pub ca_seconds: i64,
    pub serving_seconds: i64,
}

impl Default for Lifetimes {
    /// A CA for five years, a serving certificate for one.
    fn default() -> Self {
        Self {
            ca_seconds: 5 * 365 * 86_400,
            serving_seconds: 365 * 86_400,
        }
    }
}

/// What to do to the Secret next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// No usable CA: make a CA and a serving certificate, and a bundle of that CA alone.
    Create,
    /// The CA has a third of its life left: make the next CA and add it to the bundle, still
    /// serving the current certificate.
    StartCaRoll,
    /// The registration trusts the next CA: issue a serving certificate from it, and make it the
    /// CA.
    FinishCaRoll,
    /// Issue a new serving certificate from the CA: the current one has a third of its life
    /// left, names other DNS names, or is not the CA's.
    RenewServing,
    /// Drop expired CAs from the bundle.
    PruneBundle,
    /// Nothing to do until `next_check` (Unix seconds).
    Wait { next_check: i64 },
}

/// How long the registration must have trusted the next CA before anything is served from it:
/// the apiserver reads registrations through an informer, so it learns of a new caBundle a
/// moment after it is stored. A minute, or a twentieth of the CA's life if that is shorter.
#[must_use]
pub fn roll_grace(lifetimes: Lifetimes) -> i64 {
    (lifetimes.ca_seconds / 20).min(60)
}

/// The next step for `held` at `now`. `trusted_since` says since when (Unix seconds) the
/// registration's caBundle has held every CA of the Secret's bundle, the next CA included.
#[must_use]
pub fn decide(held: &Held, now: i64, lifetimes: Lifetimes, trusted_since: Option<i64>) -> Step {
    let Some(ca) = held.ca.as_ref().filter(|c| c.not_after > now) else {
        return Step::Create;
    };
    if let Some(next) = &held.next_ca {
        if trusted_since.is_some_and(|t| now - t >= roll_grace(lifetimes)) && next.not_after > now {
            return Step::FinishCaRoll;
        }
    } else if ca.not_after - now < lifetimes.ca_seconds / 3 {
        return Step::StartCaRoll;
    }
    // Two thirds into its own life: a certificate cut short by its CA's expiry is renewed at two
    // thirds of what it got, never at once on every pass.
    let serving_renew_at = held
        .serving
        .as_ref()
        .map(|s| s.cert.not_before + (s.cert.not_after - s.cert.not_before) * 2 / 3);
    match (&held.serving, serving_renew_at) {
        (Some(s), Some(at)) if s.signed_by_ca && s.names_match && now < at => {}
        _ => return Step::RenewServing,
    }
    if held.bundle.iter().any(|c| c.not_after <= now) {
        return Step::PruneBundle;
    }
    if !held.bundle.iter().any(|c| c.der == ca.der) {
        // The CA in use must be trusted: a hand-edited bundle that lost it is rebuilt.
        return Step::PruneBundle;
    }
    let mut next_check = serving_renew_at.unwrap_or(now);
    if held.next_ca.is_none() {
        next_check = next_check.min(ca.not_after - lifetimes.ca_seconds / 3);
    } else if let Some(t) = trusted_since {
        next_check = next_check.min(t + roll_grace(lifetimes));
    }
    for c in &held.bundle {
        next_check = next_check.min(c.not_after);
    }
    Step::Wait { next_check }
}

/// The validity of a serving certificate issued at `now` by a CA that expires at
/// `ca_not_after`: `lifetime` long, but never past its CA. Backdated by a minute, or a tenth of
/// its life if that is shorter, for clocks a little behind.
#[must_use]
pub fn serving_validity(now: i64, lifetime: i64, ca_not_after: i64) -> (i64, i64) {
    let skew = (lifetime / 10).min(60);
    (now - skew, (now + lifetime).min(ca_not_after))
}

/// The validity of a CA made at `now`.
#[must_use]
pub fn ca_validity(now: i64, lifetime: i64) -> (i64, i64) {
    let skew = (lifetime / 10).min(60);
    (now - skew, now + lifetime)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400;

    fn cert(tag: u8, not_after: i64) -> Cert {
        // Issued a year before it expires (a CA's is longer, but only its end is read).
        Cert {
            not_before: not_after - 365 * DAY,
            not_after,
            der: vec![tag],
        }
    }

    /// A healthy Secret made at `made`: CA for 5 years, serving for 1.
    fn healthy(made: i64) -> Held {
        let ca = cert(1, made + 5 * 365 * DAY);
        Held {
            ca: Some(ca.clone()),
            serving: Some(Serving {
                cert: cert(2, made + 365 * DAY),
                signed_by_ca: true,
                names_match: true,
            }),
            next_ca: None,
            bundle: vec![ca],
        }
    }

    #[test]
    fn an_empty_or_broken_secret_is_created() {
        let l = Lifetimes::default();
        assert_eq!(decide(&Held::default(), 0, l, None), Step::Create);
        let mut expired = healthy(0);
        expired.ca = Some(cert(1, 100));
        assert_eq!(decide(&expired, 100, l, Some(0)), Step::Create);
    }

    #[test]
    fn a_healthy_secret_waits_until_its_serving_certificate_has_a_third_left() {
        let l = Lifetimes::default();
        let h = healthy(0);
        let renew_at = 365 * DAY - 365 * DAY / 3;
        assert_eq!(
            decide(&h, 10, l, Some(0)),
            Step::Wait {
                next_check: renew_at
            }
        );
        assert_eq!(decide(&h, renew_at, l, Some(0)), Step::RenewServing);
    }

    #[test]
    fn a_serving_certificate_for_other_names_or_not_the_cas_is_renewed_at_once() {
        let l = Lifetimes::default();
        for broken in [
            |s: &mut Serving| s.names_match = false,
            |s: &mut Serving| s.signed_by_ca = false,
        ] {
            let mut h = healthy(0);
            broken(h.serving.as_mut().unwrap());
            assert_eq!(decide(&h, 10, l, Some(0)), Step::RenewServing);
        }
        let mut missing = healthy(0);
        missing.serving = None;
        assert_eq!(decide(&missing, 10, l, Some(0)), Step::RenewServing);
    }

    #[test]
    fn a_ca_roll_adds_the_next_ca_first_and_serves_from_it_only_once_trusted() {
        let l = Lifetimes::default();
        let mut h = healthy(0);
        let late = 5 * 365 * DAY - 5 * 365 * DAY / 3 + 1;
        assert_eq!(decide(&h, late, l, Some(0)), Step::StartCaRoll);
        h.next_ca = Some(cert(3, late + 5 * 365 * DAY));
        h.bundle.push(cert(3, late + 5 * 365 * DAY));
        let serving = &mut h.serving.as_mut().unwrap().cert;
        (serving.not_before, serving.not_after) = (late, late + 300 * DAY);
        // Not yet in the registration: keep serving from the current CA.
        assert!(matches!(decide(&h, late, l, None), Step::Wait { .. }));
        // Trusted, but the apiserver may not have read it yet: wait out the grace.
        assert_eq!(
            decide(&h, late, l, Some(late - 59)),
            Step::Wait {
                next_check: late + 1
            }
        );
        assert_eq!(decide(&h, late, l, Some(late - 60)), Step::FinishCaRoll);
    }

    #[test]
    fn an_expired_ca_leaves_the_bundle_and_the_ca_in_use_is_always_in_it() {
        let l = Lifetimes::default();
        let mut h = healthy(0);
        h.bundle.push(cert(9, 50));
        assert_eq!(decide(&h, 60, l, Some(0)), Step::PruneBundle);
        let mut lost = healthy(0);
        lost.bundle = vec![cert(9, 10 * 365 * DAY)];
        assert_eq!(decide(&lost, 60, l, Some(0)), Step::PruneBundle);
    }

    #[test]
    fn a_certificate_cut_short_by_its_ca_is_renewed_at_two_thirds_of_what_it_got() {
        let l = Lifetimes::default();
        let mut h = healthy(0);
        // Issued at 1,000 with 300 s left on its CA, so 300 s long, not a year.
        let serving = &mut h.serving.as_mut().unwrap().cert;
        (serving.not_before, serving.not_after) = (1000, 1300);
        assert_eq!(
            decide(&h, 1100, l, Some(0)),
            Step::Wait { next_check: 1200 }
        );
        assert_eq!(decide(&h, 1200, l, Some(0)), Step::RenewServing);
    }

    #[test]
    fn a_serving_certificate_never_outlives_its_ca_and_short_lives_are_backdated_less() {
        assert_eq!(serving_validity(1000, 365 * DAY, 2000), (940, 2000));
        assert_eq!(serving_validity(1000, 90, 1_000_000), (991, 1090));
        assert_eq!(ca_validity(1000, 300), (970, 1300));
    }
}

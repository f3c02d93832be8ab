//! Runs the pure admission path in a loop, for a profiler:
//! `valgrind --tool=callgrind target/release/examples/profile_review FILE [N]`.

use outpost_webhook::core::{admission, policy::Policy};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or("usage: profile_review REVIEW.json [ITERATIONS]")?;
    let n: usize = args.next().map_or(Ok(1000), |s| s.parse())?;
    let body = std::fs::read(path)?;
    let policy = Policy::builtin()?;
    let mut total = 0;
    for _ in 0..n {
        let (_, outcome, response) = admission::review(&policy, std::hint::black_box(&body))?;
        total += outcome.ops.len() + response.len();
    }
    println!("{total}");
    Ok(())
}

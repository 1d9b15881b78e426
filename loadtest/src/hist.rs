//! Latency histograms (HDR, microseconds, 3 significant digits): one per worker, merged at the
//! end, so recording never contends.

use hdrhistogram::Histogram;

/// The highest latency recorded exactly (60 s); anything slower is clamped to it.
pub const MAX_US: u64 = 60_000_000;

pub fn new() -> Histogram<u64> {
    // bounds are constants that hdrhistogram accepts; fall back to an auto-resizing one anyway
    Histogram::new_with_bounds(1, MAX_US, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable_hist()))
}

fn unreachable_hist() -> Histogram<u64> {
    // Histogram::new(3) cannot fail for 3 significant figures; keep the signature total.
    Histogram::new_with_max(MAX_US, 2).unwrap_or_else(|e| panic!("hdrhistogram refused its own bounds: {e}"))
}

pub fn record(h: &mut Histogram<u64>, micros: u64) {
    let _ = h.record(micros.clamp(1, MAX_US));
}

/// Merges `parts` into one histogram.
pub fn merge(parts: &[Histogram<u64>]) -> Histogram<u64> {
    let mut all = new();
    for p in parts {
        let _ = all.add(p);
    }
    all
}

/// The percentiles we report: p50, p90, p99, p99.9 and max, in microseconds.
pub fn percentiles(h: &Histogram<u64>) -> [u64; 5] {
    [h.value_at_quantile(0.5), h.value_at_quantile(0.9), h.value_at_quantile(0.99), h.value_at_quantile(0.999), h.max()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_histograms_give_the_percentiles_of_all_samples() {
        let mut a = new();
        let mut b = new();
        for v in 1..=500 {
            record(&mut a, v);
        }
        for v in 501..=1000 {
            record(&mut b, v);
        }
        let all = merge(&[a, b]);
        assert_eq!(all.len(), 1000);
        let [p50, p90, p99, p999, max] = percentiles(&all);
        assert!((499..=501).contains(&p50), "{p50}");
        assert!((899..=901).contains(&p90), "{p90}");
        assert!((989..=991).contains(&p99), "{p99}");
        assert!((998..=1000).contains(&p999), "{p999}");
        assert_eq!(max, 1000);
    }

    #[test]
    fn out_of_range_samples_are_clamped_not_lost() {
        let mut h = new();
        record(&mut h, 0);
        record(&mut h, MAX_US * 10);
        assert_eq!(h.len(), 2);
        assert!(h.max() >= MAX_US - MAX_US / 1000);
    }
}

//! Summary statistics for the benches, examples and tests: one definition of
//! each, so that figures printed by different programs mean the same thing.

/// The nearest-rank percentile `q` (0 to 1) of sorted samples: the smallest
/// sample with at least a fraction `q` of all samples at or below it (`q` = 0
/// gives the minimum, 1 the maximum). `None` for no samples.
pub fn percentile<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// The median of sorted samples: the middle one, or the mean of the middle
/// two for an even count. `None` for no samples.
pub fn median(sorted: &[f64]) -> Option<f64> {
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// The samples sorted ascending (NaN last), for [`percentile`] and [`median`].
pub fn sorted(samples: impl IntoIterator<Item = f64>) -> Vec<f64> {
    let mut v: Vec<f64> = samples.into_iter().collect();
    v.sort_by(f64::total_cmp);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s = [1u64, 2, 3, 4, 5, 6, 7, 8, 9, 10];
        assert_eq!(percentile(&s, 0.0), Some(1));
        assert_eq!(percentile(&s, 0.5), Some(5));
        assert_eq!(percentile(&s, 0.95), Some(10));
        assert_eq!(percentile(&s, 0.9), Some(9));
        assert_eq!(percentile(&s, 1.0), Some(10));
        assert_eq!(percentile::<u64>(&[], 0.5), None);
        assert_eq!(percentile(&[7.5], 0.95), Some(7.5));
    }

    #[test]
    fn medians_odd_even_and_empty() {
        assert_eq!(median(&[1.0, 2.0, 9.0]), Some(2.0));
        assert_eq!(median(&[1.0, 2.0, 4.0, 9.0]), Some(3.0));
        assert_eq!(median(&[]), None);
        assert_eq!(sorted([3.0, f64::NAN, 1.0])[..2], [1.0, 3.0]);
    }
}

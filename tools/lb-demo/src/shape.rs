//! The ramp's shape: when it starts rising, its peak, when it drops.

use lb_load::Ramp;

pub(crate) struct Shape {
    /// When the rate first rises; `None` if it never does.
    pub(crate) start: Option<f64>,
    pub(crate) peak: f64,
    /// When the rate starts falling after the peak.
    pub(crate) drop: Option<f64>,
    /// The last point: the rate after it holds.
    pub(crate) end: f64,
}

impl Shape {
    pub(crate) fn of(ramp: &Ramp) -> Shape {
        const STEP: f64 = 0.05;
        let end = ramp.end();
        let n = (end / STEP).ceil() as usize + 1;
        let times: Vec<f64> = (0..=n).map(|i| i as f64 * STEP).collect();
        let peak = times.iter().map(|&t| ramp.rate_at(t)).fold(0.0, f64::max);
        let rises = |t: f64| ramp.rate_at(t + STEP) > ramp.rate_at(t) + 1e-9;
        let falls = |t: f64| ramp.rate_at(t + STEP) < ramp.rate_at(t) - 1e-9;
        let start = times.iter().copied().find(|&t| t < end && rises(t)).map(|t| round_to(t, STEP));
        let peak_at = times.iter().copied().find(|&t| ramp.rate_at(t) >= peak - 1e-9).unwrap_or(0.0);
        let drop = times.iter().copied().find(|&t| t >= peak_at && t < end && falls(t)).map(|t| round_to(t, STEP));
        Shape { start, peak, drop, end }
    }

    /// What the load is doing at `t`, for the panel.
    pub(crate) fn phase(&self, ramp: &Ramp, t: f64) -> String {
        let rate = ramp.rate_at(t);
        let next = ramp.rate_at(t + 1.0);
        if t >= self.end {
            format!("tail at {rate:.0} req/s, waiting for the scale-in")
        } else if self.start.is_some_and(|s| t < s) {
            format!("warm-up at {rate:.0} req/s")
        } else if next > rate + 1e-6 {
            format!("ramping up, {rate:.0} -> {:.0} req/s", self.peak)
        } else if next < rate - 1e-6 {
            format!("load dropping from {rate:.0} req/s")
        } else {
            format!("holding {rate:.0} req/s")
        }
    }
}

pub(crate) fn round_to(v: f64, step: f64) -> f64 {
    (v / step).round() * step
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autoscale::DEFAULT_RAMP;

    #[test]
    fn the_default_ramp_has_its_shape() {
        let ramp = Ramp::parse(DEFAULT_RAMP).unwrap();
        let s = Shape::of(&ramp);
        assert_eq!(s.start, Some(10.0));
        assert_eq!(s.peak, 140.0);
        assert_eq!(s.drop, Some(55.0));
        assert_eq!(s.end, 56.0);
        assert!(s.phase(&ramp, 5.0).starts_with("warm-up"));
        assert!(s.phase(&ramp, 15.0).starts_with("ramping up"));
        assert!(s.phase(&ramp, 40.0).starts_with("holding 140"));
        assert!(s.phase(&ramp, 60.0).starts_with("tail at 10"));
    }
}

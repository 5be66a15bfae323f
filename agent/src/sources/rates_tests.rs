use super::*;

fn secs(t0: Instant, s: f64) -> Instant {
    t0 + Duration::from_secs_f64(s)
}

#[test]
fn a_steady_counter_gives_its_slope_in_every_window() {
    let t0 = Instant::now();
    let mut r = Rates::<1>::default();
    // 0.5 CPU seconds per second, in nanoseconds, sampled every second for 10 minutes.
    for s in 0..=600u64 {
        r.push(secs(t0, s as f64), [Some(s * 500_000_000)]);
    }
    for w in 0..WINDOWS.len() {
        let rate = r.rate(w, 0).expect("rate") / 1e9;
        assert!((rate - 0.5).abs() < 1e-9, "window {w}: {rate}");
    }
}

#[test]
fn short_and_long_windows_see_different_histories() {
    let t0 = Instant::now();
    let mut r = Rates::<1>::default();
    let mut v = 0u64;
    // Idle for 290 s, then 100 units/s for the last 10 s.
    for s in 1..=300u64 {
        if s > 290 {
            v += 100;
        }
        r.push(secs(t0, s as f64), [Some(v)]);
    }
    let ten = r.rate(0, 0).expect("10s");
    let five_min = r.rate(2, 0).expect("5m");
    assert!((ten - 100.0).abs() < 1e-6, "{ten}");
    // 1000 units over the 299 s of history held.
    assert!((five_min - 1000.0 / 299.0).abs() < 1e-6, "{five_min}");
}

#[test]
fn a_counter_reset_starts_a_new_baseline_without_negative_rates() {
    let t0 = Instant::now();
    let mut r = Rates::<2>::default();
    for s in 0..20u64 {
        r.push(secs(t0, s as f64), [Some(1_000 + s * 10), Some(5)]);
    }
    // The container restarts: its counters start again from nearly zero.
    r.push(secs(t0, 20.0), [Some(3), Some(0)]);
    for w in 0..3 {
        assert_eq!(
            r.rate(w, 0),
            None,
            "one sample after a reset has no rate yet"
        );
    }
    r.push(secs(t0, 21.0), [Some(13), Some(0)]);
    for w in 0..3 {
        let rate = r.rate(w, 0).expect("rate after the new baseline");
        assert!((rate - 10.0).abs() < 1e-9, "window {w}: {rate}");
    }
    assert_eq!(r.resets(), 1);
}

#[test]
fn an_absent_counter_has_no_rate_and_does_not_reset_others() {
    let t0 = Instant::now();
    let mut r = Rates::<2>::default();
    r.push(t0, [Some(0), None]);
    r.push(secs(t0, 1.0), [Some(7), None]);
    assert_eq!(r.rate(0, 1), None);
    assert_eq!(r.rate(0, 0), Some(7.0));
    assert_eq!(r.resets(), 0);
}

#[test]
fn history_stays_bounded_at_a_fast_tick() {
    let t0 = Instant::now();
    let mut r = Rates::<1>::default();
    for i in 0..100_000u64 {
        r.push(secs(t0, i as f64 * 0.01), [Some(i)]);
    }
    assert!(
        r.held() <= 3 * (SAMPLES_PER_WINDOW as usize + 3),
        "held {}",
        r.held()
    );
    let rate = r.rate(2, 0).expect("rate");
    assert!((rate - 100.0).abs() < 1e-6, "{rate}");
}

#[test]
fn a_recreated_cgroup_under_the_same_key_starts_again() {
    let t0 = Instant::now();
    let mut table = RateTable::<&str, 1>::default();
    table.update("svc", 10, t0, [Some(0)]);
    table.retain_updated();
    table.update("svc", 10, secs(t0, 1.0), [Some(100)]);
    table.retain_updated();
    // Same name, new inode, and a counter that happens to be higher: still a new series.
    let r = table.update("svc", 11, secs(t0, 2.0), [Some(150)]);
    assert_eq!(r.rate(0, 0), None);
    table.retain_updated();
    table.retain_updated();
    assert!(table.is_empty(), "series not updated in a scan are dropped");
}

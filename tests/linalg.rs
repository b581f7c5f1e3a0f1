//! The float64 SVDs (src/linalg.rs): the exact one against matrices built from known singular
//! values (values, reconstruction, orthogonality, wide/tall/rank-deficient shapes), the
//! randomised truncation against the exact one and the Eckart–Young bound.

use tinytune::linalg::{matmul, orthonormalize_columns, randomized_svd, svd, transpose, Svd};

fn gaussian(m: usize, n: usize, seed: u64) -> Vec<f64> {
    (0..m * n).map(|i| tinytune::rng::normal_at(seed, 7, i as u64)).collect()
}

/// `[m, k]` with orthonormal columns.
fn orthonormal(m: usize, k: usize, seed: u64) -> Vec<f64> {
    let mut q = gaussian(m, k, seed);
    orthonormalize_columns(&mut q, m, k);
    q
}

/// `Q1 diag(sigma) Q2ᵀ`, `[m, n]`.
fn with_singular_values(m: usize, n: usize, sigma: &[f64], seed: u64) -> Vec<f64> {
    let k = sigma.len();
    let (q1, q2) = (orthonormal(m, k, seed), orthonormal(n, k, seed + 1));
    let scaled: Vec<f64> = (0..m * k).map(|i| q1[i] * sigma[i % k]).collect();
    matmul(&scaled, &transpose(&q2, n, k), m, k, n)
}

fn norm(a: &[f64]) -> f64 {
    a.iter().map(|x| x * x).sum::<f64>().sqrt()
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

/// `‖XᵀX − I‖_max` for the `[rows, cols]` matrix `x` (orthonormal columns).
fn orthogonality(x: &[f64], rows: usize, cols: usize) -> f64 {
    let g = matmul(&transpose(x, rows, cols), x, cols, rows, cols);
    (0..cols * cols).map(|i| (g[i] - (i / cols == i % cols) as u8 as f64).abs()).fold(0.0, f64::max)
}

fn check_exact(a: &[f64], m: usize, n: usize, d: &Svd) {
    let k = m.min(n);
    assert_eq!((d.m, d.n, d.k, d.u.len(), d.s.len(), d.vt.len()), (m, n, k, m * k, k, k * n));
    assert!(d.s.windows(2).all(|w| w[0] >= w[1]) && d.s.iter().all(|&s| s >= 0.0), "{:?}", d.s);
    let err = max_abs_diff(&d.reconstruct(), a);
    assert!(err <= 1e-12 * norm(a).max(1.0), "{m}×{n}: reconstruction error {err}");
    assert!(orthogonality(&d.u, m, k) < 1e-12, "{m}×{n}: UᵀU {}", orthogonality(&d.u, m, k));
    assert!(orthogonality(&transpose(&d.vt, k, n), n, k) < 1e-12, "{m}×{n}: VᵀV");
}

#[test]
fn exact_svd_recovers_known_singular_values_on_tall_wide_and_square_matrices() {
    for (m, n) in [(7, 5), (5, 7), (1, 4), (4, 1), (33, 17), (17, 33), (12, 12)] {
        let k = m.min(n);
        let sigma: Vec<f64> = (0..k).map(|i| 3.0 * 0.7f64.powi(i as i32) + 0.01).collect();
        let a = with_singular_values(m, n, &sigma, (m * 100 + n) as u64);
        let d = svd(&a, m, n).unwrap();
        check_exact(&a, m, n, &d);
        assert!(max_abs_diff(&d.s, &sigma) < 1e-12, "{m}×{n}: {:?} vs {sigma:?}", d.s);
    }
    // A plain Gaussian matrix (no structure), and its transpose: the same singular values.
    let a = gaussian(9, 6, 3);
    let (d, dt) = (svd(&a, 9, 6).unwrap(), svd(&transpose(&a, 9, 6), 6, 9).unwrap());
    check_exact(&a, 9, 6, &d);
    assert!(max_abs_diff(&d.s, &dt.s) < 1e-12);
}

#[test]
fn exact_svd_of_rank_deficient_matrices_keeps_u_orthonormal() {
    // Rank 2 in a 6×4 matrix; and the zero matrix.
    let sigma = [2.0, 0.5];
    let a = with_singular_values(6, 4, &sigma, 11);
    let d = svd(&a, 6, 4).unwrap();
    check_exact(&a, 6, 4, &d);
    assert!((d.s[0] - 2.0).abs() < 1e-12 && (d.s[1] - 0.5).abs() < 1e-12 && d.s[2] < 1e-12 && d.s[3] < 1e-12, "{:?}", d.s);
    let z = svd(&[0.0; 12], 3, 4).unwrap();
    assert!(z.s.iter().all(|&s| s == 0.0) && z.reconstruct().iter().all(|&v| v == 0.0));
}

#[test]
fn randomized_svd_matches_the_exact_truncation() {
    // A decaying spectrum, as weight matrices and gradient sign matrices have.
    let (m, n, k) = (80, 50, 6);
    let sigma: Vec<f64> = (0..50).map(|i| 10.0 * 0.8f64.powi(i)).collect();
    let a = with_singular_values(m, n, &sigma, 21);
    let exact = svd(&a, m, n).unwrap();
    let r = randomized_svd(&a, m, n, k, 10, 4, 5).unwrap();
    assert_eq!((r.k, r.u.len(), r.vt.len()), (k, m * k, k * n));
    for i in 0..k {
        assert!((r.s[i] - exact.s[i]).abs() < 1e-8 * exact.s[0], "σ{i}: {} vs {}", r.s[i], exact.s[i]);
    }
    assert!(orthogonality(&r.u, m, k) < 1e-10 && orthogonality(&transpose(&r.vt, k, n), n, k) < 1e-10);
    // Eckart–Young: no rank-k matrix is closer than sqrt(Σ_{i≥k} σᵢ²); the sketch gets there.
    let best = sigma[k..].iter().map(|s| s * s).sum::<f64>().sqrt();
    let err = norm(&a.iter().zip(r.reconstruct()).map(|(x, y)| x - y).collect::<Vec<_>>());
    assert!(err >= best * (1.0 - 1e-9) && err <= best * (1.0 + 1e-6), "error {err} vs best {best}");
    // Without power iterations on a flat spectrum it is worse than the best, yet seeded.
    let flat = gaussian(60, 40, 8);
    let (r1, r2) = (randomized_svd(&flat, 60, 40, 5, 5, 0, 9).unwrap(), randomized_svd(&flat, 60, 40, 5, 5, 0, 9).unwrap());
    assert_eq!(r1.s, r2.s, "the same seed, the same result");
    let ex = svd(&flat, 60, 40).unwrap();
    assert!(r1.s[0] <= ex.s[0] * (1.0 + 1e-12), "a sketch never exceeds the top singular value");
}

#[test]
fn bad_input_is_an_error_naming_the_shape_or_the_entry() {
    let e = svd(&[1.0; 5], 2, 3).unwrap_err().to_string();
    assert!(e.contains("5 values for a 2×3 matrix"), "{e}");
    let e = svd(&[1.0, f64::NAN, 0.0, 1.0], 2, 2).unwrap_err().to_string();
    assert!(e.contains("(0, 1)") && e.contains("NaN"), "{e}");
    let e = randomized_svd(&[1.0; 6], 2, 3, 3, 2, 1, 0).unwrap_err().to_string();
    assert!(e.contains("rank 3 must lie in 1..=2"), "{e}");
}

//! Dense linear algebra in float64 on the host: QR orthonormalisation and the singular value
//! decomposition, exact and truncated (randomised). What LoRA-XS and LoRA-SB initialise from.
//!
//! Matrices are row-major `&[f64]` with their shape beside them. The routines are plain loops
//! (rows in parallel where it pays): their inputs are one weight matrix at a time.
//!
//! - [`svd`]: the exact thin SVD `A = U Σ Vᵀ` by one-sided Jacobi rotations (Hestenes 1958;
//!   Demmel & Veselić 1992): orthogonalise the columns of `A` (of `Aᵀ` when wider than tall)
//!   pairwise until every pair is orthogonal to working precision; the column norms are `Σ`,
//!   the normalised columns `U`, the accumulated rotations `V`. Accurate to a few ulps relative
//!   to ‖A‖ and simple enough to read; `O(m n² · sweeps)`, so for the small matrices.
//! - [`randomized_svd`]: the rank-`k` truncation by Halko, Martinsson & Tropp (2011): a seeded
//!   Gaussian sketch `Y = A Ω` with `k + p` columns, `q` power iterations `Y ← A (Aᵀ Y)`, each
//!   step re-orthonormalised (QR), then `B = Qᵀ A` is small and decomposed exactly:
//!   `A ≈ (Q U_B) Σ V_Bᵀ`. Its error is near the best rank-`k` error once `q` is a few.

use rayon::prelude::*;

use crate::error::{Error, Result};

/// A thin SVD `A ≈ U diag(s) Vᵀ` with `k` singular values, largest first.
#[derive(Debug, Clone)]
pub struct Svd {
    /// `[m, k]`, orthonormal columns.
    pub u: Vec<f64>,
    /// `k` values, descending, non-negative.
    pub s: Vec<f64>,
    /// `Vᵀ`: `[k, n]`, orthonormal rows.
    pub vt: Vec<f64>,
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

impl Svd {
    /// `U diag(s) Vᵀ`, `[m, n]`.
    pub fn reconstruct(&self) -> Vec<f64> {
        let (m, n, k) = (self.m, self.n, self.k);
        let mut out = vec![0.0; m * n];
        out.par_chunks_mut(n.max(1)).enumerate().for_each(|(i, row)| {
            for j in 0..k {
                let c = self.u[i * k + j] * self.s[j];
                if c != 0.0 {
                    for (o, v) in row.iter_mut().zip(&self.vt[j * n..(j + 1) * n]) {
                        *o += c * v;
                    }
                }
            }
        });
        out
    }

    /// The first `k` singular triples.
    pub fn truncate(&self, k: usize) -> Svd {
        let k = k.min(self.k);
        let u = (0..self.m).flat_map(|i| self.u[i * self.k..i * self.k + k].to_vec()).collect();
        Svd { u, s: self.s[..k].to_vec(), vt: self.vt[..k * self.n].to_vec(), m: self.m, n: self.n, k }
    }
}

fn check(a: &[f64], m: usize, n: usize, op: &'static str) -> Result<()> {
    if a.len() != m * n || m == 0 || n == 0 {
        return Err(Error::Shape { op, msg: format!("{} values for a {m}×{n} matrix", a.len()) });
    }
    if let Some(i) = a.iter().position(|v| !v.is_finite()) {
        return Err(Error::InvalidArgument { op, msg: format!("entry ({}, {}) is {}", i / n, i % n, a[i]) });
    }
    Ok(())
}

/// `Aᵀ` of a row-major `[m, n]`.
pub fn transpose(a: &[f64], m: usize, n: usize) -> Vec<f64> {
    let mut t = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            t[j * m + i] = a[i * n + j];
        }
    }
    t
}

/// `A B` for row-major `A: [m, k]`, `B: [k, n]`.
pub fn matmul(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0.0; m * n];
    out.par_chunks_mut(n.max(1)).enumerate().for_each(|(i, row)| {
        for p in 0..k {
            let c = a[i * k + p];
            if c != 0.0 {
                for (o, v) in row.iter_mut().zip(&b[p * n..(p + 1) * n]) {
                    *o += c * v;
                }
            }
        }
    });
    out
}

/// Orthonormalises the columns of the row-major `[m, l]` matrix `y` in place (modified
/// Gram–Schmidt, run twice: "twice is enough", Giraud et al. 2005). A column that is
/// numerically in the span of the ones before it becomes 0, so the rank shows as zero columns.
pub fn orthonormalize_columns(y: &mut [f64], m: usize, l: usize) {
    let mut cols: Vec<Vec<f64>> = (0..l).map(|j| (0..m).map(|i| y[i * l + j]).collect()).collect();
    let norms0: Vec<f64> = cols.iter().map(|c| dot(c, c).sqrt()).collect();
    for j in 0..l {
        let (done, rest) = cols.split_at_mut(j);
        let c = &mut rest[0];
        for _ in 0..2 {
            for q in done.iter() {
                let d = dot(q, c);
                c.iter_mut().zip(q).for_each(|(x, qv)| *x -= d * qv);
            }
        }
        let nrm = dot(c, c).sqrt();
        if nrm > 1e-12 * norms0[j].max(f64::MIN_POSITIVE) && nrm > 0.0 {
            c.iter_mut().for_each(|x| *x /= nrm);
        } else {
            c.iter_mut().for_each(|x| *x = 0.0);
        }
    }
    for (j, c) in cols.iter().enumerate() {
        for i in 0..m {
            y[i * l + j] = c[i];
        }
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The exact thin SVD of the row-major `[m, n]` matrix `a`: `min(m, n)` singular triples,
/// largest first (see the module documentation).
pub fn svd(a: &[f64], m: usize, n: usize) -> Result<Svd> {
    check(a, m, n, "svd")?;
    if m < n {
        // A = U Σ Vᵀ  ⇔  Aᵀ = V Σ Uᵀ.
        let t = svd(&transpose(a, m, n), n, m)?;
        return Ok(Svd { u: transpose(&t.vt, t.k, m), s: t.s, vt: transpose(&t.u, n, t.k), m, n, k: t.k });
    }
    // Columns of A (m ≥ n) and of V, as vectors.
    let mut cols: Vec<Vec<f64>> = (0..n).map(|j| (0..m).map(|i| a[i * n + j]).collect()).collect();
    let mut v: Vec<Vec<f64>> = (0..n).map(|j| (0..n).map(|i| (i == j) as u8 as f64).collect()).collect();
    let eps = f64::EPSILON;
    for _sweep in 0..60 {
        let mut rotated = false;
        for p in 0..n {
            for q in p + 1..n {
                let (alpha, beta, gamma) = (dot(&cols[p], &cols[p]), dot(&cols[q], &cols[q]), dot(&cols[p], &cols[q]));
                if gamma == 0.0 || gamma.abs() <= eps * (alpha * beta).sqrt() {
                    continue;
                }
                rotated = true;
                // The rotation that zeroes the (p, q) entry of the 2×2 Gram matrix.
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                for vecs in [&mut cols, &mut v] {
                    let (lo, hi) = vecs.split_at_mut(q);
                    for (x, y) in lo[p].iter_mut().zip(hi[0].iter_mut()) {
                        let (xp, yq) = (*x, *y);
                        *x = c * xp - s * yq;
                        *y = s * xp + c * yq;
                    }
                }
            }
        }
        if !rotated {
            break;
        }
    }
    let mut order: Vec<(f64, usize)> = cols.iter().enumerate().map(|(j, c)| (dot(c, c).sqrt(), j)).collect();
    order.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let k = n;
    let (mut u, mut vt, mut s) = (vec![0.0; m * k], vec![0.0; k * n], Vec::with_capacity(k));
    for (r, &(sigma, j)) in order.iter().enumerate() {
        s.push(sigma);
        for i in 0..m {
            u[i * k + r] = if sigma > 0.0 { cols[j][i] / sigma } else { 0.0 };
        }
        vt[r * n..(r + 1) * n].copy_from_slice(&v[j]);
    }
    if s.first().is_some_and(|&s0| s0 > 0.0) {
        // Columns of U for zero singular values: any orthonormal completion. Gram–Schmidt of
        // the unit vectors against the columns so far gives one.
        complete_zero_columns(&mut u, m, k, &s);
    }
    Ok(Svd { u, s, vt, m, n, k })
}

/// Replaces the zero columns of `u` (where `s` is 0) by unit vectors orthogonal to the others.
fn complete_zero_columns(u: &mut [f64], m: usize, k: usize, s: &[f64]) {
    let mut e = 0;
    for r in 0..k {
        if s[r] > 0.0 && (0..m).any(|i| u[i * k + r] != 0.0) {
            continue;
        }
        while e < m {
            let mut c: Vec<f64> = (0..m).map(|i| (i == e) as u8 as f64).collect();
            e += 1;
            for _ in 0..2 {
                for q in 0..k {
                    if q == r {
                        continue;
                    }
                    let d: f64 = (0..m).map(|i| u[i * k + q] * c[i]).sum();
                    (0..m).for_each(|i| c[i] -= d * u[i * k + q]);
                }
            }
            let nrm = dot(&c, &c).sqrt();
            if nrm > 1e-8 {
                (0..m).for_each(|i| u[i * k + r] = c[i] / nrm);
                break;
            }
        }
    }
}

/// The rank-`k` truncated SVD of the row-major `[m, n]` matrix `a` by a randomised range
/// finder: `oversample` extra sketch columns, `power_iters` power iterations, the Gaussian
/// sketch drawn from `seed` (see the module documentation).
pub fn randomized_svd(a: &[f64], m: usize, n: usize, k: usize, oversample: usize, power_iters: usize, seed: u64) -> Result<Svd> {
    check(a, m, n, "randomized_svd")?;
    if k == 0 || k > m.min(n) {
        return Err(Error::InvalidArgument {
            op: "randomized_svd",
            msg: format!("rank {k} must lie in 1..={} for a {m}×{n} matrix", m.min(n)),
        });
    }
    let l = (k + oversample).min(m.min(n));
    // Ω: [n, l] standard normal, entry i of stream `seed`.
    let omega: Vec<f64> = (0..n * l).map(|i| crate::rng::normal_at(seed, 0, i as u64)).collect();
    let at = transpose(a, m, n);
    let mut q = matmul(a, &omega, m, n, l);
    orthonormalize_columns(&mut q, m, l);
    for _ in 0..power_iters {
        let mut z = matmul(&at, &q, n, m, l);
        orthonormalize_columns(&mut z, n, l);
        q = matmul(a, &z, m, n, l);
        orthonormalize_columns(&mut q, m, l);
    }
    // B = Qᵀ A: [l, n], decomposed exactly.
    let b = matmul(&transpose(&q, m, l), a, l, m, n);
    let small = svd(&b, l, n)?;
    let u = matmul(&q, &small.u, m, l, small.k);
    Ok(Svd { u, s: small.s, vt: small.vt, m, n, k: small.k }.truncate(k))
}

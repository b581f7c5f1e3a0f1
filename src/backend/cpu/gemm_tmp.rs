//! TEMPORARY naive gemm until the blocked kernel lands.
pub fn gemm_f32(m: usize, n: usize, k: usize, a: &[f32], a_rs: usize, a_cs: usize, b: &[f32], b_rs: usize, b_cs: usize, c: &mut [f32]) {
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0;
            for p in 0..k {
                s += a[i * a_rs + p * a_cs] * b[p * b_rs + j * b_cs];
            }
            c[i * n + j] = s;
        }
    }
}
pub fn gemm_f64(m: usize, n: usize, k: usize, a: &[f64], a_rs: usize, a_cs: usize, b: &[f64], b_rs: usize, b_cs: usize, c: &mut [f64]) {
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0;
            for p in 0..k {
                s += a[i * a_rs + p * a_cs] * b[p * b_rs + j * b_cs];
            }
            c[i * n + j] = s;
        }
    }
}

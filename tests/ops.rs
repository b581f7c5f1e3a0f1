//! Every op: forward against float64 references, non-contiguous inputs, gradients against
//! finite differences (see `common::check`).

mod common;
use common::*;
use std::f64::consts::PI;
use tinytune::{CrossEntropyReduction, DType, Device, RopeLayout, Tensor};

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}
fn erf(x: f64) -> f64 {
    // Reference erf by its Taylor series (converges fast for |x| < 4, the range used here).
    let mut sum = 0.0;
    let mut term = x;
    for n in 0..80 {
        sum += term / (2 * n + 1) as f64;
        term *= -x * x / (n + 1) as f64;
    }
    2.0 / PI.sqrt() * sum
}

#[test]
fn elementwise_unary() {
    unary("neg", Dom::Normal, |x| x.neg(), |x| -x);
    unary("exp", Dom::Normal, |x| x.exp(), f64::exp);
    unary("log", Dom::Positive, |x| x.log(), f64::ln);
    unary("sqrt", Dom::Positive, |x| x.sqrt(), f64::sqrt);
    unary("rsqrt", Dom::Positive, |x| x.rsqrt(), |x| 1.0 / x.sqrt());
    unary("recip", Dom::Positive, |x| x.recip(), |x| 1.0 / x);
    unary("sqr", Dom::Normal, |x| x.sqr(), |x| x * x);
    unary("powf", Dom::Positive, |x| x.powf(2.7), |x| x.powf(2.7));
    unary("powf_neg", Dom::Positive, |x| x.powf(-1.5), |x| x.powf(-1.5));
    unary("abs", Dom::AwayFromZero, |x| x.abs(), f64::abs);
    unary("sign", Dom::AwayFromZero, |x| x.sign(), f64::signum);
    unary("tanh", Dom::Normal, |x| x.tanh(), f64::tanh);
    unary("sigmoid", Dom::Normal, |x| x.sigmoid(), sigmoid);
    unary("erf", Dom::Normal, |x| x.erf(), erf);
    unary("relu", Dom::AwayFromZero, |x| x.relu(), |x| x.max(0.0));
    unary("gelu", Dom::Normal, |x| x.gelu(), |x| 0.5 * x * (1.0 + erf(x / 2f64.sqrt())));
    unary("gelu_tanh", Dom::Normal, |x| x.gelu_tanh(), |x| 0.5 * x * (1.0 + ((2.0 / PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh()));
    unary("silu", Dom::Normal, |x| x.silu(), |x| x * sigmoid(x));
    unary("affine", Dom::Normal, |x| x.affine(-1.5, 0.25), |x| -1.5 * x + 0.25);
    unary("add_scalar", Dom::Normal, |x| x.add_scalar(3.0), |x| x + 3.0);
    unary("mul_scalar", Dom::Normal, |x| x.mul_scalar(-2.0), |x| x * -2.0);
    // Values near the clamp bounds are avoided by AwayFromZero around 0 ± 0.05 only; use bounds
    // that normal samples rarely straddle within the finite-difference step.
    unary("clamp", Dom::Normal, |x| x.clamp(-0.5, 0.7), |x| x.clamp(-0.5, 0.7));
}

#[test]
fn elementwise_binary() {
    binary("add", [Dom::Normal; 2], |a, b| a.add(b), |a, b| a + b);
    binary("sub", [Dom::Normal; 2], |a, b| a.sub(b), |a, b| a - b);
    binary("mul", [Dom::Normal; 2], |a, b| a.mul(b), |a, b| a * b);
    binary("div", [Dom::Normal, Dom::Positive], |a, b| a.div(b), |a, b| a / b);
    binary("maximum", [Dom::Distinct; 2], |a, b| a.maximum(b), f64::max);
    binary("minimum", [Dom::Distinct; 2], |a, b| a.minimum(b), f64::min);
}

#[test]
fn where_and_masked_fill() {
    let cond = Tensor::from_vec(vec![1u32, 0, 1, 1, 0, 0, 1, 0, 1, 0, 0, 1], &[3, 4], &Device::Cpu).unwrap();
    let c = cond.to_vec_f64().unwrap();
    let c2 = c.clone();
    check(
        "where",
        &[&[3, 4], &[4]],
        &[Dom::Normal],
        TOL,
        |t| Tensor::where_cond(&cond, &t[0], &t[1]),
        move |r| Nd::new(&[3, 4], (0..12).map(|i| if c2[i] != 0.0 { r[0].data[i] } else { r[1].data[i % 4] }).collect()),
    );
    let mask = Tensor::from_vec(vec![1.0f32, 0.0, 0.0, 1.0], &[1, 4], &Device::Cpu).unwrap();
    check(
        "masked_fill",
        &[&[3, 4]],
        &[Dom::Normal],
        TOL,
        |t| t[0].masked_fill(&mask, -7.0),
        |r| Nd::new(&[3, 4], (0..12).map(|i| if i % 4 == 0 || i % 4 == 3 { -7.0 } else { r[0].data[i] }).collect()),
    );
}

#[test]
fn reductions() {
    check("sum_axis1", &[&[3, 4, 5]], &[Dom::Normal], TOL, |t| t[0].sum(&[1], false), |r| r[0].reduce(1, |v| v.iter().sum()));
    check(
        "sum_keepdim",
        &[&[3, 4, 5]],
        &[Dom::Normal],
        TOL,
        |t| t[0].sum(&[-1], true),
        |r| {
            let s = r[0].reduce(2, |v| v.iter().sum());
            Nd::new(&[3, 4, 1], s.data)
        },
    );
    check(
        "sum_two_axes",
        &[&[3, 4, 5]],
        &[Dom::Normal],
        TOL,
        |t| t[0].sum(&[0, 2], false),
        |r| r[0].reduce(2, |v| v.iter().sum()).reduce(0, |v| v.iter().sum()),
    );
    check("sum_all", &[&[3, 1, 5]], &[Dom::Normal], TOL, |t| t[0].sum_all(), |r| Nd::new(&[], vec![r[0].data.iter().sum()]));
    check(
        "mean",
        &[&[6, 7]],
        &[Dom::Normal],
        TOL,
        |t| t[0].mean(&[0], false),
        |r| r[0].reduce(0, |v| v.iter().sum::<f64>() / v.len() as f64),
    );
    check(
        "mean_all",
        &[&[2, 3, 4]],
        &[Dom::Normal],
        TOL,
        |t| t[0].mean_all(),
        |r| Nd::new(&[], vec![r[0].data.iter().sum::<f64>() / 24.0]),
    );
    check(
        "max",
        &[&[4, 6, 3]],
        &[Dom::Distinct],
        TOL,
        |t| t[0].max(1, false),
        |r| r[0].reduce(1, |v| v.iter().cloned().fold(f64::MIN, f64::max)),
    );
    check(
        "min",
        &[&[4, 6, 3]],
        &[Dom::Distinct],
        TOL,
        |t| t[0].min(-1, true),
        |r| {
            let m = r[0].reduce(2, |v| v.iter().cloned().fold(f64::MAX, f64::min));
            Nd::new(&[4, 6, 1], m.data)
        },
    );
}

#[test]
fn argmax_argmin() {
    let mut rng = TestRng::new(5);
    let nd = random_nd(&[5, 7, 3], Dom::Distinct, &mut rng);
    for permuted in [false, true] {
        let (x, _) = make_input(&nd, DType::F32, permuted, false);
        for axis in 0..3 {
            let am = x.argmax(axis as isize, false).unwrap();
            assert_eq!(am.dtype(), DType::U32);
            let want =
                nd.reduce(axis, |v| v.iter().enumerate().fold((0, f64::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0 as f64);
            assert_eq!(am.to_vec_f64().unwrap(), want.data, "argmax axis {axis}");
            let an = x.argmin(axis as isize, true).unwrap();
            let want =
                nd.reduce(axis, |v| v.iter().enumerate().fold((0, f64::MAX), |b, (i, &x)| if x < b.1 { (i, x) } else { b }).0 as f64);
            assert_eq!(an.to_vec_f64().unwrap(), want.data, "argmin axis {axis}");
        }
    }
    // Ties resolve to the first index.
    let t = Tensor::from_vec(vec![1.0f32, 3.0, 3.0, 0.0], &[4], &Device::Cpu).unwrap();
    assert_eq!(t.argmax(0, false).unwrap().to_vec::<u32>().unwrap(), vec![1]);
}

fn ref_softmax(v: &[f64]) -> Vec<f64> {
    let m = v.iter().cloned().fold(f64::MIN, f64::max);
    let s: f64 = v.iter().map(|x| (x - m).exp()).sum();
    v.iter().map(|x| (x - m).exp() / s).collect()
}

#[test]
fn softmax_and_log_softmax() {
    for (shape, axis) in [(&[3usize, 5][..], 1usize), (&[2, 4, 3][..], 1), (&[4, 1][..], 1), (&[3, 7][..], 0)] {
        check("softmax", &[shape], &[Dom::Normal], TOL, |t| t[0].softmax(axis as isize), |r| r[0].along(axis, ref_softmax));
        check(
            "log_softmax",
            &[shape],
            &[Dom::Normal],
            TOL,
            |t| t[0].log_softmax(axis as isize),
            |r| r[0].along(axis, |v| ref_softmax(v).iter().map(|p| p.ln()).collect()),
        );
    }
    // Stable for large logits.
    let t = Tensor::from_vec(vec![1000.0f32, 0.0, -1000.0], &[3], &Device::Cpu).unwrap();
    let y = t.softmax(0).unwrap().to_vec::<f32>().unwrap();
    assert_eq!(y, vec![1.0, 0.0, 0.0]);
    let l = t.log_softmax(0).unwrap().to_vec::<f32>().unwrap();
    assert!(l[0] == 0.0 && (l[1] + 1000.0).abs() < 1e-3);
}

fn ref_batched_matmul(a: &Nd, b: &Nd) -> Nd {
    let (ra, rb) = (a.shape.len(), b.shape.len());
    let (m, k, n) = (a.shape[ra - 2], a.shape[ra - 1], b.shape[rb - 1]);
    let batch = broadcast(&a.shape[..ra - 2], &b.shape[..rb - 2]);
    let mut shape = batch.clone();
    shape.extend([m, n]);
    let nb: usize = batch.iter().product();
    let mut data = vec![0.0; nb * m * n];
    for bi in 0..nb {
        let bidx = unravel(bi, &batch);
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0;
                for p in 0..k {
                    let mut ia = bidx.clone();
                    ia.extend([i, p]);
                    let mut ib = bidx.clone();
                    ib.extend([p, j]);
                    s += a.at_broadcast(&ia) * b.at_broadcast(&ib);
                }
                data[(bi * m + i) * n + j] = s;
            }
        }
    }
    Nd::new(&shape, data)
}

#[test]
fn matmul() {
    let cases: [(&[usize], &[usize]); 6] = [
        (&[3, 4], &[4, 5]),
        (&[1, 1], &[1, 1]),
        (&[2, 3, 7], &[7, 5]),
        (&[2, 1, 3, 4], &[3, 4, 2]),
        (&[5, 17], &[17, 9]),
        (&[2, 3, 4], &[2, 4, 1]),
    ];
    for (a, b) in cases {
        check("matmul", &[a, b], &[Dom::Normal], TOL, |t| t[0].matmul(&t[1]), |r| ref_batched_matmul(&r[0], &r[1]));
    }
    // Either operand transposed (read in place), and vectors.
    check(
        "matmul_bt",
        &[&[3, 4], &[5, 4]],
        &[Dom::Normal],
        TOL,
        |t| t[0].matmul(&t[1].t()?),
        |r| {
            let bt = Nd::new(&[4, 5], (0..20).map(|i| r[1].at(&[i % 5, i / 5])).collect());
            ref_batched_matmul(&r[0], &bt)
        },
    );
    check(
        "matmul_at",
        &[&[4, 3], &[4, 5]],
        &[Dom::Normal],
        TOL,
        |t| t[0].t()?.matmul(&t[1]),
        |r| {
            let at = Nd::new(&[3, 4], (0..12).map(|i| r[0].at(&[i % 4, i / 4])).collect());
            ref_batched_matmul(&at, &r[1])
        },
    );
    check(
        "matvec",
        &[&[3, 4], &[4]],
        &[Dom::Normal],
        TOL,
        |t| t[0].matmul(&t[1]),
        |r| {
            let b = Nd::new(&[4, 1], r[1].data.clone());
            Nd::new(&[3], ref_batched_matmul(&r[0], &b).data)
        },
    );
    // A larger product against the reference, forward only (exercises the blocked kernel).
    let mut rng = TestRng::new(9);
    let (a, b) = (random_nd(&[67, 131], Dom::Normal, &mut rng), random_nd(&[131, 45], Dom::Normal, &mut rng));
    let want = ref_batched_matmul(&a, &b);
    let (ta, tb) = (make_input(&a, DType::F32, false, false).0, make_input(&b, DType::F32, true, false).0);
    assert_close("matmul_large", "forward", &ta.matmul(&tb).unwrap().to_vec_f64().unwrap(), &want.data, 1e-4);
}

fn ref_norm(v: &[f64], w: Option<&[f64]>, b: Option<&[f64]>, eps: f64, rms: bool) -> Vec<f64> {
    let n = v.len() as f64;
    let mean = if rms { 0.0 } else { v.iter().sum::<f64>() / n };
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    v.iter().enumerate().map(|(j, x)| (x - mean) / (var + eps).sqrt() * w.map_or(1.0, |w| w[j]) + b.map_or(0.0, |b| b[j])).collect()
}

#[test]
fn norms() {
    for shape in [&[4usize, 6][..], &[2, 3, 5], &[3, 1]] {
        let d = *shape.last().unwrap();
        check(
            "layer_norm",
            &[shape, &[d], &[d]],
            &[Dom::Normal],
            TOL,
            |t| t[0].layer_norm(Some(&t[1]), Some(&t[2]), 1e-5),
            |r| {
                let (w, b) = (r[1].data.clone(), r[2].data.clone());
                r[0].along(shape.len() - 1, |v| ref_norm(v, Some(&w), Some(&b), 1e-5, false))
            },
        );
        check(
            "layer_norm_bias_only",
            &[shape, &[d]],
            &[Dom::Normal],
            TOL,
            |t| t[0].layer_norm(None, Some(&t[1]), 1e-5),
            |r| {
                let b = r[1].data.clone();
                r[0].along(shape.len() - 1, |v| ref_norm(v, None, Some(&b), 1e-5, false))
            },
        );
        check(
            "layer_norm_plain",
            &[shape],
            &[Dom::Normal],
            TOL,
            |t| t[0].layer_norm(None, None, 1e-5),
            |r| r[0].along(shape.len() - 1, |v| ref_norm(v, None, None, 1e-5, false)),
        );
        check(
            "rms_norm",
            &[shape, &[d]],
            &[Dom::Normal],
            TOL,
            |t| t[0].rms_norm(Some(&t[1]), 1e-6),
            |r| {
                let w = r[1].data.clone();
                r[0].along(shape.len() - 1, |v| ref_norm(v, Some(&w), None, 1e-6, true))
            },
        );
    }
}

#[test]
fn embedding_index_select_gather() {
    let ids = Tensor::from_vec(vec![2u32, 0, 2, 4, 1, 2], &[2, 3], &Device::Cpu).unwrap();
    let idv = [2usize, 0, 2, 4, 1, 2];
    check(
        "embedding",
        &[&[5, 3]],
        &[Dom::Normal],
        TOL,
        |t| t[0].embedding(&ids),
        |r| Nd::new(&[2, 3, 3], idv.iter().flat_map(|&i| (0..3).map(move |j| (i, j))).map(|(i, j)| r[0].at(&[i, j])).collect()),
    );
    let sel = Tensor::from_vec(vec![3i32, 1, 1], &[3], &Device::Cpu).unwrap();
    check(
        "index_select_axis1",
        &[&[2, 4, 3]],
        &[Dom::Normal],
        TOL,
        |t| t[0].index_select(1, &sel),
        |r| {
            let s = [3usize, 1, 1];
            Nd::new(
                &[2, 3, 3],
                (0..18)
                    .map(|i| {
                        let ix = unravel(i, &[2, 3, 3]);
                        r[0].at(&[ix[0], s[ix[1]], ix[2]])
                    })
                    .collect(),
            )
        },
    );
    let gidx = Tensor::from_vec(vec![0u32, 2, 1, 1, 3, 0], &[3, 2], &Device::Cpu).unwrap();
    let gv = [0usize, 2, 1, 1, 3, 0];
    check(
        "gather_axis1",
        &[&[3, 4]],
        &[Dom::Normal],
        TOL,
        |t| t[0].gather(1, &gidx),
        |r| Nd::new(&[3, 2], (0..6).map(|i| r[0].at(&[i / 2, gv[i]])).collect()),
    );
    let gidx0 = Tensor::from_vec(vec![1u32, 0, 1, 2, 2, 0], &[2, 3], &Device::Cpu).unwrap();
    let gv0 = [1usize, 0, 1, 2, 2, 0];
    check(
        "gather_axis0",
        &[&[3, 4]],
        &[Dom::Normal],
        TOL,
        |t| t[0].gather(0, &gidx0),
        |r| Nd::new(&[2, 3], (0..6).map(|i| r[0].at(&[gv0[i], i % 3])).collect()),
    );
}

#[test]
fn concat_split_narrow() {
    check(
        "concat_axis1",
        &[&[2, 3, 2], &[2, 1, 2], &[2, 4, 2]],
        &[Dom::Normal],
        TOL,
        |t| Tensor::concat(&[&t[0], &t[1], &t[2]], 1),
        |r| {
            Nd::new(
                &[2, 8, 2],
                (0..32)
                    .map(|i| {
                        let ix = unravel(i, &[2, 8, 2]);
                        match ix[1] {
                            j if j < 3 => r[0].at(&[ix[0], j, ix[2]]),
                            3 => r[1].at(&[ix[0], 0, ix[2]]),
                            j => r[2].at(&[ix[0], j - 4, ix[2]]),
                        }
                    })
                    .collect(),
            )
        },
    );
    check(
        "concat_axis0",
        &[&[1, 3], &[2, 3]],
        &[Dom::Normal],
        TOL,
        |t| Tensor::concat(&[&t[0], &t[1]], 0),
        |r| Nd::new(&[3, 3], r[0].data.iter().chain(&r[1].data).cloned().collect()),
    );
    check(
        "narrow",
        &[&[4, 6]],
        &[Dom::Normal],
        TOL,
        |t| t[0].narrow(1, 2, 3)?.mul_scalar(2.0),
        |r| Nd::new(&[4, 3], (0..12).map(|i| 2.0 * r[0].at(&[i / 3, 2 + i % 3])).collect()),
    );
    check(
        "split_recombined",
        &[&[5, 4]],
        &[Dom::Normal],
        TOL,
        |t| {
            let p = t[0].split(&[2, 3], 0)?;
            p[0].sum(&[0], false)?.mul(&p[1].sum(&[0], false)?)
        },
        |r| {
            let top = (0..4).map(|j| r[0].at(&[0, j]) + r[0].at(&[1, j]));
            let bot = (0..4).map(|j| (2..5).map(|i| r[0].at(&[i, j])).sum::<f64>());
            Nd::new(&[4], top.zip(bot).map(|(a, b)| a * b).collect())
        },
    );
}

#[test]
fn views_transpose_reshape_broadcast() {
    check(
        "transpose_contiguous",
        &[&[2, 3, 4]],
        &[Dom::Normal],
        TOL,
        |t| t[0].transpose(0, 2)?.contiguous()?.reshape(&[4, -1]),
        |r| {
            Nd::new(
                &[4, 6],
                (0..24)
                    .map(|i| {
                        let ix = unravel(i, &[4, 3, 2]);
                        r[0].at(&[ix[2], ix[1], ix[0]])
                    })
                    .collect(),
            )
        },
    );
    check(
        "broadcast_to",
        &[&[3, 1]],
        &[Dom::Normal],
        TOL,
        |t| t[0].broadcast_to(&[2, 3, 4])?.mul_scalar(1.0),
        |r| Nd::new(&[2, 3, 4], (0..24).map(|i| r[0].at(&[(i / 4) % 3, 0])).collect()),
    );
    check(
        "unsqueeze_squeeze",
        &[&[3, 4]],
        &[Dom::Normal],
        TOL,
        |t| t[0].unsqueeze(1)?.squeeze(1)?.unsqueeze(-1)?.sum(&[0], false),
        |r| Nd::new(&[4, 1], r[0].reduce(0, |v| v.iter().sum()).data),
    );
}

fn ref_rope(x: &Nd, pos0: usize, base: f64, interleaved: bool) -> Nd {
    let r = x.shape.len();
    let (seq, dim) = (x.shape[r - 2], x.shape[r - 1]);
    let half = dim / 2;
    let mut out = x.clone();
    for row in 0..x.numel() / dim {
        let p = (row % seq + pos0) as f64;
        for i in 0..half {
            let th = p * base.powf(-2.0 * i as f64 / dim as f64);
            let (a, b) = if interleaved { (2 * i, 2 * i + 1) } else { (i, i + half) };
            let (xa, xb) = (x.data[row * dim + a], x.data[row * dim + b]);
            out.data[row * dim + a] = xa * th.cos() - xb * th.sin();
            out.data[row * dim + b] = xb * th.cos() + xa * th.sin();
        }
    }
    out
}

#[test]
fn rope_both_layouts() {
    for (layout, inter) in [(RopeLayout::HalfSplit, false), (RopeLayout::Interleaved, true)] {
        for shape in [&[2usize, 3, 5, 8][..], &[1, 4], &[3, 6]] {
            let (seq, dim) = (shape[shape.len() - 2], shape[shape.len() - 1]);
            check(
                "rope",
                &[shape],
                &[Dom::Normal],
                TOL,
                |t| {
                    let (c, s) = Tensor::rope_tables(3, seq, dim, 10000.0, t[0].dtype(), &Device::Cpu)?;
                    t[0].rope(&c, &s, layout)
                },
                |r| ref_rope(&r[0], 3, 10000.0, inter),
            );
        }
    }
}

#[test]
fn cross_entropy() {
    let targets = Tensor::from_vec(vec![2i32, 0, -100, 4, 1], &[5], &Device::Cpu).unwrap();
    let tv = [2i64, 0, -100, 4, 1];
    let ce = |r: &Nd| -> Vec<f64> {
        (0..5)
            .map(|i| {
                if tv[i] < 0 {
                    return 0.0;
                }
                let row: Vec<f64> = (0..6).map(|j| r.at(&[i, j])).collect();
                -ref_softmax(&row)[tv[i] as usize].ln()
            })
            .collect()
    };
    check(
        "cross_entropy_mean",
        &[&[5, 6]],
        &[Dom::Normal],
        TOL,
        |t| t[0].cross_entropy(&targets, -100, CrossEntropyReduction::Mean),
        |r| Nd::new(&[], vec![ce(&r[0]).iter().sum::<f64>() / 4.0]),
    );
    check(
        "cross_entropy_sum",
        &[&[5, 6]],
        &[Dom::Normal],
        TOL,
        |t| t[0].cross_entropy(&targets, -100, CrossEntropyReduction::Sum),
        |r| Nd::new(&[], vec![ce(&r[0]).iter().sum::<f64>()]),
    );
    check(
        "cross_entropy_none",
        &[&[5, 6]],
        &[Dom::Normal],
        TOL,
        |t| t[0].cross_entropy(&targets, -100, CrossEntropyReduction::None),
        |r| Nd::new(&[5], ce(&r[0])),
    );
    // 3-d logits [batch, seq, vocab] with u32 targets.
    let t3 = Tensor::from_vec(vec![1u32, 3, 0, 2, 2, 1], &[2, 3], &Device::Cpu).unwrap();
    let tv3 = [1usize, 3, 0, 2, 2, 1];
    check(
        "cross_entropy_3d",
        &[&[2, 3, 4]],
        &[Dom::Normal],
        TOL,
        |t| t[0].cross_entropy(&t3, -100, CrossEntropyReduction::Mean),
        |r| {
            let s: f64 = (0..6)
                .map(|i| {
                    let row: Vec<f64> = (0..4).map(|j| r[0].at(&[i / 3, i % 3, j])).collect();
                    -ref_softmax(&row)[tv3[i]].ln()
                })
                .sum();
            Nd::new(&[], vec![s / 6.0])
        },
    );
    // Stable with huge logits.
    let x = Tensor::from_vec(vec![1000.0f32, -1000.0, 0.0], &[1, 3], &Device::Cpu).unwrap();
    let t = Tensor::from_vec(vec![0u32], &[1], &Device::Cpu).unwrap();
    assert_eq!(x.cross_entropy(&t, -100, CrossEntropyReduction::Mean).unwrap().to_scalar().unwrap(), 0.0);
}

#[test]
fn casts_between_dtypes() {
    let x = Tensor::from_vec(vec![1.5f32, -2.25, 3.0, 65504.0], &[4], &Device::Cpu).unwrap();
    assert_eq!(x.to_dtype(DType::F16).unwrap().to_vec_f64().unwrap(), vec![1.5, -2.25, 3.0, 65504.0]);
    assert_eq!(x.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap().to_vec::<f32>().unwrap()[..3], [1.5, -2.25, 3.0]);
    assert_eq!(x.to_dtype(DType::I32).unwrap().to_vec::<i32>().unwrap(), vec![1, -2, 3, 65504]);
    check("to_dtype_roundtrip", &[&[3, 4]], &[Dom::Normal], TOL, |t| t[0].to_dtype(DType::F64)?.to_dtype(t[0].dtype()), |r| r[0].clone());
}

/// Shapes large enough to split into several parallel chunks, on permuted inputs, so the
/// strided iteration is exercised across chunk boundaries (forward only; small shapes above
/// cover the gradients).
#[test]
fn large_and_non_contiguous_kernels() {
    let mut rng = TestRng::new(77);
    let nd = random_nd(&[300, 257], Dom::Normal, &mut rng);
    let bias = random_nd(&[257], Dom::Normal, &mut rng);
    let (b, _) = make_input(&bias, DType::F32, false, false);
    for permuted in [false, true] {
        let (x, _) = make_input(&nd, DType::F32, permuted, false);
        let close = |what: &str, got: &Tensor, want: &Nd, tol: f64| {
            assert_eq!(got.shape(), want.shape.as_slice(), "{what}");
            assert_close("large", what, &got.to_vec_f64().unwrap(), &want.data, tol)
        };
        close("exp", &x.exp().unwrap(), &nd.map(f64::exp), 2e-6);
        close("add broadcast", &x.add(&b).unwrap(), &nd.zip(&bias, |a, b| a + b), 2e-6);
        close("contiguous of transpose", &x.t().unwrap().contiguous().unwrap().t().unwrap(), &nd, 1e-7);
        for axis in 0..2 {
            close("sum", &x.sum(&[axis as isize], false).unwrap(), &nd.reduce(axis, |v| v.iter().sum()), 1e-5);
            close("max", &x.max(axis as isize, false).unwrap(), &nd.reduce(axis, |v| v.iter().cloned().fold(f64::MIN, f64::max)), 1e-7);
            close("softmax", &x.softmax(axis as isize).unwrap(), &nd.along(axis, ref_softmax), 1e-5);
        }
        let s = x.sum_all().unwrap().to_scalar().unwrap();
        assert!((s - nd.data.iter().sum::<f64>()).abs() < 1e-3, "sum_all {s}");
    }
    // One very long row (split across threads) and a wide column reduction.
    let long = random_nd(&[2, 100_003], Dom::Normal, &mut rng);
    let (t, _) = make_input(&long, DType::F32, false, false);
    assert_close("large", "long rows", &t.sum(&[1], false).unwrap().to_vec_f64().unwrap(), &long.reduce(1, |v| v.iter().sum()).data, 1e-4);
    let wide = random_nd(&[40, 3001], Dom::Normal, &mut rng);
    let (t, _) = make_input(&wide, DType::F32, false, false);
    assert_close("large", "columns", &t.sum(&[0], false).unwrap().to_vec_f64().unwrap(), &wide.reduce(0, |v| v.iter().sum()).data, 1e-5);
    assert_close(
        "large",
        "column max",
        &t.max(0, false).unwrap().to_vec_f64().unwrap(),
        &wide.reduce(0, |v| v.iter().cloned().fold(f64::MIN, f64::max)).data,
        1e-7,
    );
}

/// Small operands the kernels read as plain slices (norm weights, RoPE tables) may be views
/// with a storage offset: a narrowed weight or a table narrowed to later positions.
/// RoPE reads a view whose rows are contiguous but not adjacent (the attention heads'
/// `[b, t, h, d] → [b, h, t, d]` transpose, here narrowed too, so rows start at an offset) in
/// place, and gives exactly what it gives on the same values made contiguous first.
#[test]
fn rope_reads_a_heads_view_in_place() {
    let mut rng = TestRng::new(22);
    let x = random_nd(&[2, 6, 3, 8], Dom::Normal, &mut rng);
    let (xt, _) = make_input(&x, DType::F32, false, false);
    let view = xt.narrow(1, 1, 5).unwrap().transpose(1, 2).unwrap();
    assert!(!view.is_contiguous());
    for layout in [RopeLayout::HalfSplit, RopeLayout::Interleaved] {
        let (c, s) = Tensor::rope_tables(2, 5, 8, 10000.0, DType::F32, &Device::Cpu).unwrap();
        let got: Vec<f32> = view.rope(&c, &s, layout).unwrap().to_vec().unwrap();
        let want: Vec<f32> = view.contiguous().unwrap().rope(&c, &s, layout).unwrap().to_vec().unwrap();
        assert_eq!(got, want, "{layout:?}");
        let inter = layout == RopeLayout::Interleaved;
        let nd = Nd { shape: vec![2, 3, 5, 8], data: view.contiguous().unwrap().to_vec_f64().unwrap() };
        assert_close(
            "rope of a view",
            "forward",
            &got.iter().map(|&v| v as f64).collect::<Vec<_>>(),
            &ref_rope(&nd, 2, 10000.0, inter).data,
            1e-5,
        );
    }
}

#[test]
fn norm_weights_and_rope_tables_may_be_offset_views() {
    let mut rng = TestRng::new(21);
    let x = random_nd(&[3, 4], Dom::Normal, &mut rng);
    let wide = random_nd(&[12], Dom::Normal, &mut rng);
    let (xt, _) = make_input(&x, DType::F64, false, false);
    let (wt, _) = make_input(&wide, DType::F64, false, false);
    let got = xt.rms_norm(Some(&wt.narrow(0, 8, 4).unwrap()), 1e-6).unwrap().to_vec_f64().unwrap();
    let want = x.along(1, |v| ref_norm(v, Some(&wide.data[8..12]), None, 1e-6, true));
    assert_close("rms_norm offset weight", "forward", &got, &want.data, 1e-12);

    let q = random_nd(&[2, 3, 8], Dom::Normal, &mut rng);
    let (qt, _) = make_input(&q, DType::F64, false, false);
    let (cos, sin) = Tensor::rope_tables(0, 10, 8, 10000.0, DType::F64, &Device::Cpu).unwrap();
    let got = qt.rope(&cos.narrow(0, 5, 3).unwrap(), &sin.narrow(0, 5, 3).unwrap(), RopeLayout::HalfSplit).unwrap();
    assert_close("rope offset tables", "forward", &got.to_vec_f64().unwrap(), &ref_rope(&q, 5, 10000.0, false).data, 1e-12);
}

//! The chunked language-modelling loss through a frozen head (`nn::linear_cross_entropy_sum`):
//! its value against a float64 reference, its gradient against finite differences (the
//! harness of `tests/ops.rs`), and against the plain composition `head.forward(x)
//! .cross_entropy(t, Sum)` — chunk seams, ignored rows, a scaled upstream gradient, no-grad
//! mode, a trainable head (which takes the composition), a quantised head, and the GPU.

mod common;
use common::*;
use tinytune::nn::{linear_cross_entropy_sum, linear_cross_entropy_sum_chunked, Linear};
use tinytune::quant::QFormat;
use tinytune::{CrossEntropyReduction, DType, Device, Rng, Tensor};

const V: usize = 7;
const D: usize = 5;

fn weight(dev: &Device) -> Tensor {
    Tensor::randn(&[V, D], 0.0, 1.0, DType::F64, &Device::Cpu, &mut Rng::new(11)).unwrap().to_device(dev).unwrap()
}

/// Targets of a [2, 4] batch, three rows ignored (prompt or padding).
fn targets(dev: &Device) -> (Tensor, Vec<i64>) {
    let t = vec![3i32, -100, 0, 6, -100, -100, 2, 5];
    (Tensor::from_vec(t.clone(), &[2, 4], dev).unwrap(), t.iter().map(|&v| v as i64).collect())
}

fn ref_loss(x: &Nd, w: &[f64], t: &[i64]) -> f64 {
    let mut sum = 0.0;
    for (i, &ti) in t.iter().enumerate() {
        if ti < 0 {
            continue;
        }
        let z: Vec<f64> = (0..V).map(|j| (0..D).map(|k| x.data[i * D + k] * w[j * D + k]).sum()).collect();
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        sum += lse - z[ti as usize];
    }
    sum
}

#[test]
fn forward_against_float64_and_gradient_against_finite_differences() {
    let w = weight(&Device::Cpu);
    let wv = w.to_vec_f64().unwrap();
    let (t, tv) = targets(&Device::Cpu);
    // Chunks of 2 rows: the five scored rows cross two seams.
    for chunk in [2, 1 << 20] {
        let (w, t, tv, wv) = (w.clone(), t.clone(), tv.clone(), wv.clone());
        check(
            &format!("linear_cross_entropy_chunk{chunk}"),
            &[&[2, 4, D]],
            &[Dom::Normal],
            TOL,
            move |x| {
                let head = Linear::new("lm_head", w.to_dtype(x[0].dtype())?, None);
                linear_cross_entropy_sum_chunked(&head, &x[0], &t, -100, chunk)
            },
            move |r| Nd::new(&[], vec![ref_loss(&r[0], &wv, &tv)]),
        );
    }
}

/// Value and `∂/∂x` of `scale · loss(x)` by the chunked op and by the composition.
fn both(head: &Linear, x: &Tensor, t: &Tensor, chunk: usize, scale: f64) -> [(f64, Vec<f64>); 2] {
    let run = |chunked: bool| {
        let leaf = x.detach().requires_grad().unwrap();
        let loss = if chunked {
            linear_cross_entropy_sum_chunked(head, &leaf, t, -100, chunk).unwrap()
        } else {
            head.forward(&leaf).unwrap().cross_entropy(t, -100, CrossEntropyReduction::Sum).unwrap()
        };
        let value = loss.to_vec_f64().unwrap()[0];
        loss.mul_scalar(scale).unwrap().backward().unwrap();
        (value, leaf.grad().unwrap().to_vec_f64().unwrap())
    };
    [run(true), run(false)]
}

#[test]
fn equals_the_composition_at_every_chunk_size_with_a_scaled_upstream_gradient() {
    let dev = Device::Cpu;
    let head = Linear::new("lm_head", weight(&dev).to_dtype(DType::F32).unwrap(), None);
    let x = Tensor::randn(&[2, 4, D], 0.0, 1.0, DType::F32, &dev, &mut Rng::new(5)).unwrap();
    let (t, tv) = targets(&dev);
    for chunk in [1, 2, 3, 4, 1 << 20] {
        let [(v1, g1), (v2, g2)] = both(&head, &x, &t, chunk, 0.25);
        assert_close("value", &format!("chunk {chunk}"), &[v1], &[v2], 1e-6);
        assert_close("grad", &format!("chunk {chunk}"), &g1, &g2, 1e-6);
        // Ignored rows take no gradient.
        for (i, &ti) in tv.iter().enumerate() {
            if ti < 0 {
                assert!(g1[i * D..(i + 1) * D].iter().all(|&g| g == 0.0), "row {i} is ignored but has a gradient");
            }
        }
    }
    // Outside the graph: the same value.
    let v = tinytune::autograd::with_no_grad(|| linear_cross_entropy_sum_chunked(&head, &x, &t, -100, 2)).unwrap();
    assert!(!v.requires_grad_flag());
    assert_close("no-grad value", "", &v.to_vec_f64().unwrap(), &[both(&head, &x, &t, 2, 1.0)[1].0], 1e-6);
}

#[test]
fn every_target_ignored_is_a_zero_with_a_graph() {
    let dev = Device::Cpu;
    let head = Linear::new("lm_head", weight(&dev).to_dtype(DType::F32).unwrap(), None);
    let x = Tensor::randn(&[3, D], 0.0, 1.0, DType::F32, &dev, &mut Rng::new(6)).unwrap().requires_grad().unwrap();
    let t = Tensor::from_vec(vec![-100i32; 3], &[3], &dev).unwrap();
    let loss = linear_cross_entropy_sum(&head, &x, &t, -100).unwrap();
    assert_eq!(loss.to_vec_f64().unwrap(), vec![0.0]);
    loss.backward().unwrap();
    assert!(x.grad().unwrap().to_vec_f64().unwrap().iter().all(|&g| g == 0.0));
}

#[test]
fn a_trainable_head_gets_its_gradient() {
    let dev = Device::Cpu;
    let w = weight(&dev).to_dtype(DType::F32).unwrap().requires_grad().unwrap();
    let head = Linear::new("lm_head", w.clone(), None);
    let x = Tensor::randn(&[2, 4, D], 0.0, 1.0, DType::F32, &dev, &mut Rng::new(7)).unwrap();
    let (t, _) = targets(&dev);
    linear_cross_entropy_sum_chunked(&head, &x, &t, -100, 2).unwrap().backward().unwrap();
    let got = w.grad().expect("the head is trainable: it must get a gradient").to_vec_f64().unwrap();
    let w2 = w.detach().requires_grad().unwrap();
    Linear::new("lm_head", w2.clone(), None)
        .forward(&x)
        .unwrap()
        .cross_entropy(&t, -100, CrossEntropyReduction::Sum)
        .unwrap()
        .backward()
        .unwrap();
    assert_close("head grad", "", &got, &w2.grad().unwrap().to_vec_f64().unwrap(), 1e-6);
}

#[test]
fn a_quantised_head_equals_the_composition() {
    let dev = Device::Cpu;
    let w = Tensor::randn(&[40, 64], 0.0, 1.0, DType::F32, &dev, &mut Rng::new(8)).unwrap();
    let head = Linear::new("lm_head", w.quantize(QFormat::Int8).unwrap(), None);
    let x = Tensor::randn(&[9, 64], 0.0, 1.0, DType::F32, &dev, &mut Rng::new(9)).unwrap();
    let t = Tensor::from_vec(vec![1i32, 39, -100, 0, 7, 7, 12, -100, 30], &[9], &dev).unwrap();
    let [(v1, g1), (v2, g2)] = both(&head, &x, &t, 3, 1.0);
    // f32 rounding only: the GEMM sums 40–64 products in another blocking for 3-row chunks.
    assert_close("int8 head value", "", &[v1], &[v2], 1e-5);
    assert_close("int8 head grad", "", &g1, &g2, 1e-5);
}

#[test]
fn gpu_equals_cpu() {
    let Some(gpu) = gpu_device() else { return };
    let (v, d) = (1000, 48);
    let w = Tensor::randn(&[v, d], 0.0, 0.2, DType::F32, &Device::Cpu, &mut Rng::new(12)).unwrap();
    let x = Tensor::randn(&[3, 11, d], 0.0, 1.0, DType::F32, &Device::Cpu, &mut Rng::new(13)).unwrap();
    let tv: Vec<i32> = (0..33).map(|i| if i % 5 == 0 { -100 } else { (i * 37 % v) as i32 }).collect();
    let mut out = Vec::new();
    for dev in [Device::Cpu, gpu] {
        let head = Linear::new("lm_head", w.to_device(&dev).unwrap(), None);
        let t = Tensor::from_vec(tv.clone(), &[3, 11], &dev).unwrap();
        // 26 scored rows in chunks of 8: three seams.
        out.push(both(&head, &x.to_device(&dev).unwrap(), &t, 8, 1.0)[0].clone());
    }
    assert_close("gpu value", "", &[out[1].0], &[out[0].0], 2e-5);
    assert_close("gpu grad", "", &out[1].1, &out[0].1, 2e-5);
}

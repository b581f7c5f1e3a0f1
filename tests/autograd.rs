//! Autograd behaviour, randomness, masks, errors, and an end-to-end training check.

mod common;
use common::*;
use tinytune::{no_grad, CrossEntropyReduction, DType, Device, Error, Rng, Tensor};

fn t(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
}

#[test]
fn gradients_accumulate_until_zero_grad() {
    let x = t(&[1.0, 2.0, 3.0], &[3]).requires_grad().unwrap();
    for _ in 0..2 {
        x.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    }
    assert_eq!(x.grad().unwrap().to_vec::<f32>().unwrap(), vec![4.0, 8.0, 12.0]);
    x.zero_grad();
    assert!(x.grad().is_none());
    x.mul_scalar(3.0).unwrap().sum_all().unwrap().backward().unwrap();
    assert_eq!(x.grad().unwrap().to_vec::<f32>().unwrap(), vec![3.0; 3]);
}

#[test]
fn shared_subexpressions_sum_their_gradients() {
    // y = x·x + x (x used three times): dy/dx = 2x + 1.
    let x = t(&[0.5, -1.0], &[2]).requires_grad().unwrap();
    let y = x.mul(&x).unwrap().add(&x).unwrap().sum_all().unwrap();
    y.backward().unwrap();
    assert_eq!(x.grad().unwrap().to_vec::<f32>().unwrap(), vec![2.0, -1.0]);
}

#[test]
fn no_grad_and_detach_build_no_graph() {
    let x = t(&[1.0, 2.0], &[2]).requires_grad().unwrap();
    {
        let _g = no_grad();
        let y = x.exp().unwrap();
        assert!(!y.requires_grad_flag());
        assert!(matches!(y.sum_all().unwrap().backward(), Err(Error::Backward(_))));
    }
    let y = x.exp().unwrap();
    assert!(y.requires_grad_flag() && !y.is_leaf());
    let d = y.detach();
    assert!(!d.requires_grad_flag() && d.is_leaf());
    // Gradient does not flow through the detached branch.
    let z = x.mul(&d).unwrap().sum_all().unwrap();
    z.backward().unwrap();
    let e = [1f32.exp(), 2f32.exp()];
    assert_eq!(x.grad().unwrap().to_vec::<f32>().unwrap(), e.to_vec());
    // Frozen inputs (no requires_grad) get no gradient.
    let w = t(&[3.0, 4.0], &[2]);
    let x2 = t(&[1.0, 1.0], &[2]).requires_grad().unwrap();
    x2.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(w.grad().is_none());
    assert_eq!(x2.grad().unwrap().to_vec::<f32>().unwrap(), vec![3.0, 4.0]);
}

#[test]
fn backward_needs_a_scalar() {
    let x = t(&[1.0, 2.0], &[2]).requires_grad().unwrap();
    let err = x.exp().unwrap().backward().unwrap_err();
    assert!(err.to_string().contains("scalar") && err.to_string().contains("[2]"), "{err}");
}

#[test]
fn deep_graph_does_not_overflow() {
    let x = t(&[1.0], &[1]).requires_grad().unwrap();
    let mut y = x.clone();
    for _ in 0..200_000 {
        y = y.add_scalar(0.0).unwrap();
    }
    y.sum_all().unwrap().backward().unwrap();
    assert_eq!(x.grad().unwrap().to_vec::<f32>().unwrap(), vec![1.0]);
    // Drop the chain without recursing 200k frames deep.
    drop(y);
}

#[test]
fn set_data_updates_a_parameter() {
    let w = t(&[1.0, 2.0], &[2]).requires_grad().unwrap();
    w.set_data(&t(&[5.0, 6.0], &[2])).unwrap();
    assert_eq!(w.to_vec::<f32>().unwrap(), vec![5.0, 6.0]);
    assert!(w.set_data(&t(&[1.0], &[1])).is_err());
}

#[test]
fn random_streams_are_reproducible() {
    let mut a = Rng::new(42);
    let mut b = Rng::new(42);
    let x = Tensor::randn(&[1000], 0.0, 1.0, DType::F32, &Device::Cpu, &mut a).unwrap();
    let y = Tensor::randn(&[1000], 0.0, 1.0, DType::F32, &Device::Cpu, &mut b).unwrap();
    assert_eq!(x.to_vec::<f32>().unwrap(), y.to_vec::<f32>().unwrap());
    // The next draw is a different stream.
    let z = Tensor::randn(&[1000], 0.0, 1.0, DType::F32, &Device::Cpu, &mut a).unwrap();
    assert_ne!(x.to_vec::<f32>().unwrap(), z.to_vec::<f32>().unwrap());
    let u = Tensor::rand_uniform(&[10_000], -2.0, 3.0, DType::F64, &Device::Cpu, &mut a).unwrap().to_vec::<f64>().unwrap();
    assert!(u.iter().all(|&v| (-2.0..3.0).contains(&v)));
    let mean = u.iter().sum::<f64>() / u.len() as f64;
    assert!((mean - 0.5).abs() < 0.05, "mean {mean}");
}

#[test]
fn dropout_keeps_expected_fraction_and_scales() {
    let x = Tensor::ones(&[20_000], DType::F32, &Device::Cpu).unwrap().requires_grad().unwrap();
    let mut rng = Rng::new(7);
    let y = x.dropout(0.25, true, &mut rng).unwrap();
    let v = y.to_vec::<f32>().unwrap();
    let kept = v.iter().filter(|&&a| a != 0.0).count() as f64 / v.len() as f64;
    assert!((kept - 0.75).abs() < 0.02, "kept {kept}");
    assert!(v.iter().all(|&a| a == 0.0 || (a - 1.0 / 0.75).abs() < 1e-6));
    // Gradient uses the same mask.
    y.sum_all().unwrap().backward().unwrap();
    assert_eq!(x.grad().unwrap().to_vec::<f32>().unwrap(), v);
    // Same seed and offset, same mask; evaluation mode is the identity.
    let again = x.dropout(0.25, true, &mut Rng::new(7)).unwrap().to_vec::<f32>().unwrap();
    assert_eq!(again, v);
    assert_eq!(x.dropout(0.25, false, &mut rng).unwrap().to_vec::<f32>().unwrap(), vec![1.0; 20_000]);
    assert!(x.dropout(1.5, true, &mut rng).is_err());
}

#[test]
fn causal_and_padding_masks() {
    let m = Tensor::causal_mask(2, 4, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(m.to_vec::<f32>().unwrap(), vec![1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0]);
    let p = Tensor::padding_mask(&[2, 3, 0], 3, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(p.to_vec::<f32>().unwrap(), vec![1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]);
    let bias = m.mask_to_bias().unwrap().to_vec::<f32>().unwrap();
    assert_eq!(bias[..3], [0.0, 0.0, 0.0]);
    assert_eq!(bias[3], f32::MIN);
    // Masked attention: softmax over scores + bias puts no weight on masked keys.
    let scores = Tensor::zeros(&[2, 4], DType::F32, &Device::Cpu).unwrap();
    let w = scores.add(&m.mask_to_bias().unwrap()).unwrap().softmax(-1).unwrap().to_vec::<f32>().unwrap();
    assert_eq!(w[3], 0.0);
    assert!((w[0] - 1.0 / 3.0).abs() < 1e-6 && (w[4] - 0.25).abs() < 1e-6);
    assert!(Tensor::padding_mask(&[5], 3, DType::F32, &Device::Cpu).is_err());
    // A row whose keys are all masked (a padding query) stays finite: uniform, not NaN.
    let none = Tensor::zeros(&[1, 3], DType::F32, &Device::Cpu).unwrap().mask_to_bias().unwrap();
    let w = scores.narrow(0, 0, 1).unwrap().narrow(1, 0, 3).unwrap().add(&none).unwrap().softmax(-1).unwrap().to_vec::<f32>().unwrap();
    assert!(w.iter().all(|&p| (p - 1.0 / 3.0).abs() < 1e-6), "{w:?}");
}

#[test]
fn errors_name_the_op_and_shapes() {
    let a = t(&[1.0; 6], &[2, 3]);
    let b = t(&[1.0; 8], &[2, 4]);
    let e = a.add(&b).unwrap_err().to_string();
    assert!(e.contains("add") && e.contains("[2, 3]") && e.contains("[2, 4]"), "{e}");
    let e = a.matmul(&a).unwrap_err().to_string();
    assert!(e.contains("matmul") && e.contains("[2, 3]"), "{e}");
    let e = a.sum(&[2], false).unwrap_err().to_string();
    assert!(e.contains("axis 2") && e.contains("[2, 3]"), "{e}");
    let e = Tensor::from_vec(vec![1.0f32; 5], &[2, 3], &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("5 elements") && e.contains("[2, 3]"), "{e}");
    let ids = Tensor::from_vec(vec![0u32, 7], &[2], &Device::Cpu).unwrap();
    let e = a.embedding(&ids).unwrap_err().to_string();
    assert!(e.contains("index 7") && e.contains("size 2"), "{e}");
    let e = a.reshape(&[4, -1]).unwrap_err().to_string();
    assert!(e.contains("reshape"), "{e}");
    let neg = Tensor::from_vec(vec![-1i32], &[1], &Device::Cpu).unwrap();
    assert!(matches!(a.index_select(0, &neg), Err(Error::IndexOutOfRange { index: -1, .. })));
    let tg = Tensor::from_vec(vec![3u32, 0], &[2], &Device::Cpu).unwrap();
    let e = a.cross_entropy(&tg, -100, CrossEntropyReduction::Mean).unwrap_err().to_string();
    assert!(e.contains("cross_entropy") && e.contains("index 3"), "{e}");
    let h = a.to_dtype(DType::F16).unwrap();
    let e = h.exp().unwrap_err().to_string();
    assert!(e.contains("exp") && e.contains("F16"), "{e}");
    assert!(matches!(a.add(&a.to_dtype(DType::F64).unwrap()), Err(Error::DTypeMismatch { .. })));
    assert!(a.narrow(1, 2, 2).is_err());
    assert!(a.narrow(1, usize::MAX, 2).is_err(), "start + len must not wrap around");
    assert!(a.permute(&[0, 0]).is_err());
    assert!(a.transpose(0, 5).is_err());
    assert!(a.layer_norm(Some(&t(&[1.0; 2], &[2])), None, 1e-5).is_err());
    assert!(Tensor::concat(&[], 0).is_err());
    assert!(a.clamp(1.0, 0.0).is_err());
    assert!(a.softmax(3).is_err());
}

#[test]
fn empty_and_size_one_tensors() {
    let e = Tensor::zeros(&[0, 3], DType::F32, &Device::Cpu).unwrap();
    assert_eq!(e.exp().unwrap().shape(), &[0, 3]);
    assert_eq!(e.sum(&[0], false).unwrap().to_vec::<f32>().unwrap(), vec![0.0; 3]);
    let w = Tensor::ones(&[3, 2], DType::F32, &Device::Cpu).unwrap();
    assert_eq!(e.matmul(&w).unwrap().shape(), &[0, 2]);
    let k0 = Tensor::zeros(&[2, 0], DType::F32, &Device::Cpu).unwrap();
    let z = k0.matmul(&Tensor::zeros(&[0, 4], DType::F32, &Device::Cpu).unwrap()).unwrap();
    assert_eq!(z.to_vec::<f32>().unwrap(), vec![0.0; 8]);
    assert!(e.max(0, false).is_err());
    let s = Tensor::scalar(2.0, &Device::Cpu).unwrap();
    assert_eq!(s.mul(&t(&[1.0, 2.0], &[2])).unwrap().to_vec::<f32>().unwrap(), vec![2.0, 4.0]);
}

/// A 2-layer MLP trained with plain SGD written here drives a real loss down: classify
/// points of two interleaved spirals, a task no linear model solves.
#[test]
fn mlp_learns_two_spirals() {
    let dev = Device::Cpu;
    let n = 200;
    let mut data = TestRng::new(3);
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for i in 0..n {
        let class = i % 2;
        let r = (i / 2) as f64 / (n / 2) as f64 * 3.0 + 0.3;
        let a = r * 2.2 + class as f64 * std::f64::consts::PI + 0.1 * data.normal();
        xs.extend([(r * a.cos()) as f32 / 3.0, (r * a.sin()) as f32 / 3.0]);
        ys.push(class as u32);
    }
    let x = Tensor::from_vec(xs, &[n, 2], &dev).unwrap();
    let y = Tensor::from_vec(ys.clone(), &[n], &dev).unwrap();
    let mut rng = Rng::new(0);
    let h = 64;
    let w1 = Tensor::randn(&[2, h], 0.0, 1.0, DType::F32, &dev, &mut rng).unwrap().requires_grad().unwrap();
    let b1 = Tensor::zeros(&[h], DType::F32, &dev).unwrap().requires_grad().unwrap();
    let w2 = Tensor::randn(&[h, 2], 0.0, (1.0 / h as f64).sqrt(), DType::F32, &dev, &mut rng).unwrap().requires_grad().unwrap();
    let b2 = Tensor::zeros(&[2], DType::F32, &dev).unwrap().requires_grad().unwrap();
    let params = [&w1, &b1, &w2, &b2];
    let forward = || x.matmul(&w1)?.add(&b1)?.tanh()?.matmul(&w2)?.add(&b2);
    let loss_of = |logits: &Tensor| logits.cross_entropy(&y, -100, CrossEntropyReduction::Mean);
    let initial = loss_of(&forward().unwrap()).unwrap().to_scalar().unwrap();
    let lr = 0.5;
    for _ in 0..600 {
        for p in params {
            p.zero_grad();
        }
        let loss = loss_of(&forward().unwrap()).unwrap();
        loss.backward().unwrap();
        let _g = no_grad();
        for p in params {
            let step = p.sub(&p.grad().unwrap().mul_scalar(lr).unwrap()).unwrap();
            p.set_data(&step).unwrap();
        }
    }
    let logits = forward().unwrap();
    let last = loss_of(&logits).unwrap().to_scalar().unwrap();
    let pred = logits.argmax(-1, false).unwrap().to_vec::<u32>().unwrap();
    let acc = pred.iter().zip(&ys).filter(|(a, b)| a == b).count() as f64 / n as f64;
    assert!(last < 0.5 * initial, "loss {initial} -> {last}");
    assert!(acc > 0.9, "accuracy {acc} (loss {initial} -> {last})");
}

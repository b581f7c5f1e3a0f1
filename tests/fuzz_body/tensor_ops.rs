// Shared body of the `tensor_ops` fuzz target (fuzz/) and its stable-Rust smoke run
// (tests/fuzz_ops.rs): decode arbitrary bytes into shapes, views and ops, and require that the
// public API answers every one of them with a value or an error, never a panic.

use tinytune::{CrossEntropyReduction, DType, Device, RopeLayout, Tensor};

struct Bytes<'a>(&'a [u8]);
impl Bytes<'_> {
    fn next(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn shape(&mut self) -> Vec<usize> {
        let rank = (self.next() % 5) as usize;
        (0..rank).map(|_| (self.next() % 6) as usize).collect()
    }
    fn axis(&mut self) -> isize {
        (self.next() % 11) as isize - 5
    }
}

fn tensor(b: &mut Bytes) -> Tensor {
    let shape = b.shape();
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|i| (b.next() as f32 - 128.0) / 16.0 + i as f32 * 1e-3).collect();
    let t = Tensor::from_vec(data, &shape, &Device::Cpu).expect("sizes agree by construction");
    // Sometimes a non-contiguous view of the same values.
    if b.next() % 3 == 0 && t.rank() >= 2 {
        t.t().and_then(|x| x.contiguous()).and_then(|x| x.t()).unwrap_or(t)
    } else {
        t
    }
}

fn indices(b: &mut Bytes) -> Tensor {
    let shape = b.shape();
    let n: usize = shape.iter().product();
    let v: Vec<i32> = (0..n).map(|_| b.next() as i32 % 8 - 1).collect();
    Tensor::from_vec(v, &shape, &Device::Cpu).expect("sizes agree by construction")
}

pub fn run(data: &[u8]) {
    let mut b = Bytes(data);
    let x = tensor(&mut b);
    let y = tensor(&mut b);
    let x = x.requires_grad().expect("f32 can require grad");
    let op = b.next() % 32;
    let a = b.axis();
    let r = match op {
        0 => x.add(&y),
        1 => x.mul(&y),
        2 => x.div(&y),
        3 => x.matmul(&y),
        4 => x.sum(&[a], b.next() % 2 == 0),
        5 => x.max(a, false),
        6 => x.argmax(a, true),
        7 => x.softmax(a),
        8 => x.log_softmax(a),
        9 => x.transpose(a, b.axis()),
        10 => x.narrow(a, (b.next() % 6) as usize, (b.next() % 6) as usize),
        11 => x.reshape(&b.shape().iter().map(|&d| if d == 5 { -1 } else { d as isize }).collect::<Vec<_>>()),
        12 => x.broadcast_to(&b.shape()),
        13 => x.squeeze(a),
        14 => x.unsqueeze(a),
        15 => Tensor::concat(&[&x, &y], a),
        16 => x.index_select(a, &indices(&mut b)),
        17 => x.gather(a, &indices(&mut b)),
        18 => x.embedding(&indices(&mut b)),
        19 => x.cross_entropy(&indices(&mut b), -1, CrossEntropyReduction::Mean),
        20 => x.layer_norm(Some(&y), None, 1e-5),
        21 => x.rms_norm(None, (b.next() as f64 - 10.0) / 100.0),
        22 => {
            let seq = (b.next() % 6) as usize;
            let dim = (b.next() % 6) as usize * 2;
            Tensor::rope_tables(0, seq, dim, 10000.0, DType::F32, &Device::Cpu).and_then(|(c, s)| x.rope(&c, &s, RopeLayout::HalfSplit))
        }
        23 => x.split(&b.shape(), a).map(|v| v.into_iter().next().unwrap_or(x.clone())),
        24 => x.chunk((b.next() % 4) as usize, a).map(|v| v.into_iter().next().unwrap_or(x.clone())),
        25 => x.permute(&b.shape()),
        26 => Tensor::where_cond(&y, &x, &x),
        27 => x.masked_fill(&y, 1.0),
        28 => x.clamp(b.next() as f64 - 128.0, b.next() as f64 - 128.0),
        29 => x.powf(b.next() as f64 / 32.0),
        30 => x.maximum(&y),
        _ => x.mean(&[a, b.axis()], true),
    };
    if let Ok(out) = r {
        // Whatever came out must be readable, and backward must answer too.
        let _ = out.to_vec_f64().expect("results are readable");
        if out.requires_grad_flag() {
            if let Ok(s) = out.sum_all() {
                let _ = s.backward();
            }
        }
    }
}
